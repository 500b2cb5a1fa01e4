"""What the app generates with: a backend per loaded engine.

Both backends offer the same methods: `encode_chat(messages)`, `encode_text(text)`, `generate(prompts,
config, adapter) -> [Output]`, `stream(prompts, config, adapter, cancel) -> Deltas`, and the limits
`context_length`, `max_batch_size`, `vocab_size`. TransformersBackend (generation.py) serves the
TransformersEngine; VllmBackend serves the VllmEngine of `--infer_backend vllm` (a GPU with vllm).
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, Optional, Sequence

from martlet.infer.generation import GenConfig, cut_at_stop
from martlet.serve.generation import Delta, Output, TransformersBackend


def backend_for(engine: Any, *, context_length: Optional[int] = None):
    """The backend for a TransformersEngine or a VllmEngine."""
    if hasattr(engine, "llm"):
        return VllmBackend(engine, context_length=context_length)
    return TransformersBackend(engine, context_length=context_length)


class VllmBackend:
    """vLLM batches internally; its offline LLM does not stream, so a stream gets each reply whole."""

    def __init__(self, engine: Any, *, context_length: Optional[int] = None, max_batch_size: int = 256):
        self.engine = engine
        self.template = engine.template
        self.tokenizer = engine.tokenizer
        self.max_batch_size = max_batch_size
        model_config = getattr(getattr(engine.llm, "llm_engine", None), "model_config", None)
        self.context_length = context_length or getattr(model_config, "max_model_len", None)
        self.vocab_size = len(self.tokenizer)
        self.lock = threading.Lock()  # LLM.generate is not meant to be called from two threads at once

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        return self.template.encode_prompt(messages)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def default_max_tokens(self) -> Optional[int]:
        return None

    def generate(self, prompts: Sequence[list[int]], config: GenConfig, adapter: Optional[str] = None
                 ) -> list[Output]:
        if adapter not in (None, "default"):
            raise ValueError(f"vLLM serves only the checkpoint's own adapter, not {adapter!r}")
        params = self.engine._params(config)
        with self.lock:
            results = self.engine.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                               lora_request=self.engine.lora, use_tqdm=False)
        stops = [*self.template.stop_words, *config.stop_words]
        outputs = []
        for result in results:
            out = result.outputs[0]
            reason = "length" if out.finish_reason == "length" else "stop"
            outputs.append(Output(cut_at_stop(out.text, stops)[0], len(out.token_ids), reason))
        return outputs

    def stream(self, prompts: Sequence[list[int]], config: GenConfig, adapter: Optional[str] = None,
               cancel: Optional[threading.Event] = None) -> Iterator[Delta]:
        for index, output in enumerate(self.generate(prompts, config, adapter)):
            yield Delta(index, output.text, output)

"""The vLLM engine (`--infer_backend vllm`): an Engine (infer/protocol.py) for CUDA GPUs.

vllm is imported only here, when this engine is built; without vllm or a GPU it says so and stops.
vLLM batches internally; its offline `LLM` does not stream, so `stream` yields each reply whole.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Iterator, Optional, Sequence

from martlet.errors import MartletError
from martlet.infer.adapters import AS_LOADED
from martlet.infer.generation import DEFAULT_MAX_NEW_TOKENS, GenConfig, cut_at_stop
from martlet.infer.protocol import Conversation, Delta, Output, Prompt, is_token_ids
from martlet.templates.template import Template

VLLM_MAX_BATCH_SIZE = 256  # prompts handed to vLLM at once (it schedules them itself)


class VllmEngine:
    def __init__(self, model_dir: str, template: Template, *, dtype: str = "bf16", adapter_dir: Optional[str] = None,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 max_model_len: Optional[int] = None):
        try:
            import vllm
        except ImportError:
            raise MartletError("--infer_backend vllm needs the vllm package and a CUDA GPU.", field="infer_backend",
                               hint="On a GPU machine: pip install 'martlet[vllm]'. Elsewhere use --infer_backend pt."
                               ) from None
        import torch

        if not torch.cuda.is_available():
            raise MartletError("--infer_backend vllm needs a CUDA GPU; none is visible.", field="infer_backend",
                               hint="Use --infer_backend pt on this machine.")
        self.template = template
        self.tokenizer = template.tokenizer
        self.max_batch_size = VLLM_MAX_BATCH_SIZE
        self.vocab_size = len(self.tokenizer)
        self.llm = vllm.LLM(model=model_dir, dtype={"bf16": "bfloat16", "fp16": "float16"}.get(dtype, "float32"),
                            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                            max_model_len=max_model_len, enable_lora=adapter_dir is not None,
                            max_lora_rank=_lora_rank(adapter_dir))
        model_config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.context_length = max_model_len or getattr(model_config, "max_model_len", None)
        self.lock = threading.Lock()  # LLM.generate is not meant to be called from two threads at once
        self.lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("martlet-adapter", 1, adapter_dir)

    def encode_chat(self, messages: Conversation) -> list[int]:
        return self.template.encode_prompt(messages)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def model_defaults(self) -> GenConfig:
        return GenConfig()

    def _params(self, config: GenConfig):
        from vllm import SamplingParams

        greedy = config.do_sample is False or config.temperature == 0 or (config.do_sample is None
                                                                           and config.temperature is None)
        return SamplingParams(max_tokens=config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                              temperature=0.0 if greedy else (config.temperature or 1.0),
                              top_p=config.top_p or 1.0, top_k=config.top_k or -1,
                              repetition_penalty=config.repetition_penalty or 1.0, seed=config.seed,
                              stop=list(dict.fromkeys([*self.template.stop_words, *config.stop_words])))

    def generate(self, prompts: Sequence[Prompt], config: Optional[GenConfig] = None, *,
                 adapter: Optional[str] = AS_LOADED) -> list[Output]:
        if adapter not in (AS_LOADED, None, "default"):
            raise ValueError(f"vLLM serves only the checkpoint's own adapter, not {adapter!r}")
        config = config or GenConfig()
        ids = [list(p) if is_token_ids(p) else self.encode_chat(p) for p in prompts]
        with self.lock:
            results = self.llm.generate([{"prompt_token_ids": p} for p in ids], self._params(config),
                                        lora_request=self.lora, use_tqdm=False)
        stops = [*self.template.stop_words, *config.stop_words]
        outputs = []
        for prompt, result in zip(ids, results):
            out = result.outputs[0]
            reason = "length" if out.finish_reason == "length" else "stop"
            outputs.append(Output(cut_at_stop(out.text, stops)[0], len(prompt), len(out.token_ids), reason))
        return outputs

    def stream(self, prompts: Sequence[Prompt], config: Optional[GenConfig] = None, *,
               adapter: Optional[str] = AS_LOADED, cancel: Optional[threading.Event] = None) -> Iterator[Delta]:
        for index, output in enumerate(self.generate(prompts, config, adapter=adapter)):
            yield Delta(index, output.text, output)


def _lora_rank(adapter_dir: Optional[str]) -> int:
    """vLLM's max_lora_rank: the adapter's r rounded up to a size vLLM accepts (8, 16, 32, ...)."""
    if adapter_dir is None:
        return 16
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
        rank = int(json.load(fh).get("r", 8))
    size = 8
    while size < rank:
        size *= 2
    return size

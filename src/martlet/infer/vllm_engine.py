"""The vLLM engine (`--infer_backend vllm`): same interface as TransformersEngine, for CUDA GPUs.

vllm is imported only here, when this engine is built; without vllm or a GPU it says so and stops.
vLLM's offline `LLM` does not stream, so `stream` yields the whole reply at once.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

from martlet.errors import MartletError
from martlet.infer.generation import DEFAULT_MAX_NEW_TOKENS, GenConfig, cut_at_stop
from martlet.templates.template import Template


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
        self.llm = vllm.LLM(model=model_dir, dtype={"bf16": "bfloat16", "fp16": "float16"}.get(dtype, "float32"),
                            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                            max_model_len=max_model_len, enable_lora=adapter_dir is not None,
                            max_lora_rank=_lora_rank(adapter_dir))
        self.lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("martlet-adapter", 1, adapter_dir)

    def _params(self, config: GenConfig):
        from vllm import SamplingParams

        greedy = config.do_sample is False or config.temperature == 0 or (config.do_sample is None
                                                                           and config.temperature is None)
        return SamplingParams(max_tokens=config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                              temperature=0.0 if greedy else (config.temperature or 1.0),
                              top_p=config.top_p or 1.0, top_k=config.top_k or -1,
                              repetition_penalty=config.repetition_penalty or 1.0, seed=config.seed,
                              stop=list(dict.fromkeys([*self.template.stop_words, *config.stop_words])))

    def generate(self, conversations: Sequence[Sequence[dict]], config: Optional[GenConfig] = None) -> list[str]:
        config = config or GenConfig()
        prompts = [{"prompt_token_ids": self.template.encode_prompt(c)} for c in conversations]
        outputs = self.llm.generate(prompts, self._params(config), lora_request=self.lora, use_tqdm=False)
        stops = [*self.template.stop_words, *config.stop_words]
        return [cut_at_stop(out.outputs[0].text, stops)[0] for out in outputs]

    def stream(self, conversation: Sequence[dict], config: Optional[GenConfig] = None) -> Iterator[str]:
        yield self.generate([conversation], config)[0]


def _lora_rank(adapter_dir: Optional[str]) -> int:
    """vLLM's max_lora_rank: the adapter's r rounded up to a size vLLM accepts (8, 16, 32, ...)."""
    if adapter_dir is None:
        return 16
    import json
    import os

    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as fh:
        rank = int(json.load(fh).get("r", 8))
    size = 8
    while size < rank:
        size *= 2
    return size

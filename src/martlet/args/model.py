"""Which model, in what precision, with what attention and quantization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from martlet.args.base import arg


@dataclass
class ModelArguments:
    model_type: Optional[str] = arg(None, "A registered model type (`martlet list-models`); inferred from "
                                          "--model_id_or_path when left out.")
    model_id_or_path: Optional[str] = arg(None, "A local model folder, a hub id (e.g. qwen/Qwen-7B-Chat) or a model "
                                                "type. Default: the embedded SmolLM2-135M-Instruct.",
                                          aliases=("model",))
    model_revision: Optional[str] = arg(None, "Hub revision (branch, tag or commit) to download.")
    dtype: str = arg("AUTO", "Compute dtype. AUTO: bf16 where the hardware computes it natively (Ampere+ GPUs, "
                             "CPUs with AVX512-BF16/AMX), fp16 on older GPUs (V100), else fp32.",
                     aliases=("torch_dtype",), choices=("AUTO", "bf16", "fp16", "fp32"),
                     spellings={"auto": "AUTO", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"})
    check_model_is_latest: bool = arg(True, "Ask the hub for the newest files. false: use only local files "
                                            "(for machines without network).")
    trust_remote_code: bool = arg(False, "Allow a model's own Python code to run. Off by default: read the code "
                                         "first.")
    use_flash_attn: Optional[bool] = arg(None, "Use flash-attention 2 (GPU, needs the flash-attn package).")
    attn_impl: Optional[str] = arg(None, "Attention implementation: sdpa, eager or flash_attention_2. "
                                         "Default: sdpa; training on a CPU runs each sample of a padding-free "
                                         "row on its own (martlet_varlen).",
                                   choices=("sdpa", "eager", "flash_attention_2", "flex_attention"))
    quantization_bit: int = arg(0, "Load the base model quantized with bitsandbytes (QLoRA): 0 (off), 4 or 8.",
                                choices=(0, 4, 8))
    bnb_4bit_quant_type: str = arg("nf4", "4-bit quantization type.", choices=("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = arg(True, "Quantize the quantization constants too.")
    bnb_4bit_comp_dtype: str = arg("AUTO", "Compute dtype of 4-bit layers.", choices=("AUTO", "bf16", "fp16", "fp32"))
    hub_token: Optional[str] = arg(None, "Token for private hub models and for --push_to_hub.")

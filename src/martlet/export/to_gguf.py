"""A transformers model folder (llama, qwen2 or mistral) as one GGUF file for llama.cpp and Ollama.

Tensors are streamed from the safetensors files one at a time: the header (metadata and the list of
tensors with their types and sizes) is written first, then each tensor is read, converted and written.
Names follow gguf-py's own HF -> GGUF table. llama.cpp computes rotary embeddings on interleaved pairs
where transformers uses two halves per head, so for the llama architecture (Llama, Mistral) the rows of
q_proj and k_proj are reordered per head. Vectors (norms, biases) stay float32; with q4_0 the token
embedding and output matrix are kept at q8_0, as llama.cpp keeps them at higher precision too.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from martlet.errors import MartletError
from martlet.export.gguf_vocab import add_tokenizer

logger = logging.getLogger("martlet")

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> GGUF architecture
_PERMUTE_QK = {"llama"}  # GGUF architectures whose rotary layout differs from transformers'
_BIG = ("token_embd.weight", "output.weight")


@dataclass
class TensorPlan:
    hf_name: str
    name: str  # in the GGUF
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    file: str  # the safetensors file holding it


def _ggml_types():
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    types = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
             "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}
    return Q, types


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str):
    """The GGML type of one tensor in a `gguf_type` file."""
    from gguf import GGML_QUANT_SIZES

    Q, types = _ggml_types()
    if len(shape) < 2:
        return Q.F32
    wanted = types[gguf_type][0]
    if wanted == Q.Q4_0 and name in _BIG:
        wanted = Q.Q8_0
    block = GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:  # rows that do not split into whole blocks stay in 16-bit floats
        logger.info("%s: rows of %d do not split into blocks of %d; kept as f16", name, shape[-1], block)
        return Q.F16
    return wanted


def _safetensors_files(model_dir: str) -> dict[str, str]:
    """tensor name -> file, from the index of a sharded model or the one model.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            return {k: os.path.join(model_dir, v) for k, v in json.load(fh)["weight_map"].items()}
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise MartletError("no safetensors weights here.", file=model_dir,
                           hint="Export a merged or full checkpoint (--merge_lora true merges a LoRA one).")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as fh:
        return {k: single for k in fh.keys()}


def plan_tensors(model_dir: str, config: Any, arch: str, gguf_type: str) -> list[TensorPlan]:
    import gguf
    from safetensors import safe_open

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    plans = []
    by_file: dict[str, list[str]] = {}
    for hf_name, file in _safetensors_files(model_dir).items():
        by_file.setdefault(file, []).append(hf_name)
    for file, hf_names in by_file.items():
        with safe_open(file, framework="pt") as fh:
            for hf_name in sorted(hf_names):
                if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise MartletError(f"tensor '{hf_name}' has no GGUF name for architecture {arch}.",
                                       file=file, hint="Only plain llama, qwen2 and mistral models are supported.")
                shape = tuple(fh.get_slice(hf_name).get_shape())
                plans.append(TensorPlan(hf_name, name, shape, tensor_type(name, shape, gguf_type), file))
    return plans


def permute_rotary(weights, n_head: int):
    """transformers' half-split rotary rows per head -> llama.cpp's interleaved pairs (weights or bias)."""
    rows = weights.shape[0]
    half = rows // n_head // 2
    return weights.reshape(n_head, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def llama3_rope_factors(rope: dict[str, Any], theta: float, head_dim: int) -> list[float]:
    """Per-frequency divisors of Llama 3.1's rotary scaling (what llama.cpp reads from rope_freqs.weight)."""
    factor = rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(float(factor))
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), rope


def add_model_metadata(writer: Any, config: Any, gguf_type: str, name: str,
                       parameters: int) -> tuple[int, list[float] | None]:
    """Names, shape, attention and rotary settings, with the keys llama.cpp's converter writes; returns (head_dim,
    rope factors to store or None). `parameters` (the weights' count) gives the size label ('135M')."""
    from gguf import GGML_QUANT_VERSION, RopeScalingType
    from gguf.metadata import Metadata
    from gguf.utility import size_label as size_label_of

    _, types = _ggml_types()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type("model")
    writer.add_name(name)
    _, _, basename, _, _, size_label = Metadata.get_model_id_components(name, parameters)  # as llama.cpp names
    writer.add_basename(basename or name)  # a one-word name ('llama') is its own basename
    writer.add_size_label(size_label or size_label_of(parameters, 0, 0, 0))
    writer.add_file_type(types[gguf_type][1])
    writer.add_quantization_version(GGML_QUANT_VERSION)  # every file, float ones too (llama.cpp's converter)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    theta, rope = _rope(config)
    writer.add_rope_freq_base(theta)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "llama3":
        return head_dim, llama3_rope_factors(rope, theta, head_dim)
    elif kind != "default":
        raise MartletError(f"rotary scaling '{kind}' cannot be written to GGUF by Martlet yet.",
                           hint="Convert with llama.cpp's convert_hf_to_gguf.py instead.")
    return head_dim, None


def write_gguf(model_dir: str, path: str, gguf_type: str, tokenizer: Any, *, chat_template: str | None,
               eot_token: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Write the model in `model_dir` to `path` (through a temporary file); returns a summary."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise MartletError(f"model type '{config.model_type}' cannot be written to GGUF by Martlet yet "
                           f"(supported: {', '.join(sorted(ARCHS))}).", file=model_dir,
                           hint="Convert with llama.cpp's convert_hf_to_gguf.py instead.")
    plans = plan_tensors(model_dir, config, arch, gguf_type)
    tmp = f"{path}.tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        name = name or os.path.basename(model_dir)
        # transformers reads a llama-architecture file named exactly "mistral" as a Mistral model and then
        # cannot map its tensors (transformers 5.24): any other spelling loads (as Llama, the same maths)
        name = "Mistral" if name == "mistral" else name
        parameters = sum(math.prod(plan.shape) for plan in plans)
        head_dim, rope_factors = add_model_metadata(writer, config, gguf_type, name, parameters)
        kind = add_tokenizer(writer, tokenizer, config.vocab_size, chat_template, eot_token)
        extra = {}
        if rope_factors is not None:
            extra["rope_freqs.weight"] = np.asarray(rope_factors, dtype=np.float32)
        floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
        for plan in plans:  # floats are given by shape; packed types by their bytes per row
            byte_shape = gguf.quants.quant_shape_to_byte_shape(plan.shape, plan.qtype)
            dtype = np.dtype(floats.get(plan.qtype, np.uint8))
            writer.add_tensor_info(plan.name, plan.shape if dtype != np.uint8 else byte_shape, dtype,
                                   math.prod(byte_shape), raw_dtype=None if dtype != np.uint8 else plan.qtype)
        for tensor_name, array in extra.items():
            writer.add_tensor_info(tensor_name, array.shape, array.dtype, array.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        for plan in plans:
            with safe_open(plan.file, framework="pt") as fh:
                data = fh.get_tensor(plan.hf_name).float().numpy()
            if arch in _PERMUTE_QK and (".attn_q." in plan.name or ".attn_k." in plan.name):
                data = permute_rotary(data, config.num_attention_heads if ".attn_q." in plan.name else kv_heads)
            writer.write_tensor_data(gguf.quants.quantize(data, plan.qtype))
        for array in extra.values():
            writer.write_tensor_data(array)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"path": path, "gguf_type": gguf_type, "architecture": arch, "tokenizer": kind,
            "tensors": len(plans) + len(extra), "bytes": os.path.getsize(path)}

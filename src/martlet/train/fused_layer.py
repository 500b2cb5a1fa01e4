"""A llama-style decoder layer of a LoRA model as one autograd node on a CPU.

While LoRA trains on a CPU with the native kernels, a decoder layer's forward is a chain of ~20 module calls and
autograd nodes: two RMSNorms, seven LoRA projections, two rotary embeddings, the attention, SwiGLU, two residual
adds, and the views between them, each a module call through transformers' and peft's Python and a node for the
autograd engine. Their kernels are Martlet's own (train/native.py, train/kernels.py), so the layer runs them in one
C++ op with its autograd node in C++ (`martlet::decoder_layer`, martlet_native.cpp): one forward, one hand-written
backward, the same kernels in the same order as the layer's own modules, the gradients summed in the order autograd
sums them, so the same bits (tested). The first layer skips its input's gradient (frozen embeddings need none).
That takes ~600 module calls, their Python and the engine's bookkeeping of ~600 nodes out of a SmolLM2 step (1.038x
in one process against the layers' own forward; a first version of the node in Python, 1.024x slower than the C++
one; docs/en/performance.md). This module decides, per call, where it runs.

It runs where every piece of the layer would run on the native kernels anyway: a padding-free row (batch 1) on
the CPU, in bf16 or fp32, gradients on, the norms, MLP and attention fused by `native.fuse_native`, each of the
seven projections a fused LoRA layer (`kernels.fuse_lora`) with one plain adapter or a frozen layer LoRA does not
adapt, on packed frozen weights (train/packed.py), the attention `martlet_varlen`'s fused pass, no hooks on the
modules it skips. Every other call (inference, a DPO reference's forward, a cache, other models) runs the layer's
own forward: without gradients the node was measured no faster (a reference's forward through it, adapters off:
0.994x, the same bits). `MARTLET_FUSED_LAYER=0` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from martlet import patches
from martlet.train import kernels, native, packed, varlen_attention
from martlet.utils import env_switch

# transformers' decoder layers that are llama's: norm, attention, residual, norm, MLP, residual (each guarded)
LLAMA_DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")


@dataclass(frozen=True)
class Projection:
    """One projection of the layer: its frozen weight's packed copies, bias, LoRA scaling and dropout (0 and 0 for a
    frozen layer without an adapter)."""

    copy: packed.PackedWeight
    bias: torch.Tensor | None
    scaling: float
    p: float


@dataclass(frozen=True)
class Plan:
    """What a fused layer's call computes with besides its inputs: the norms' weights and epsilons, the projections
    (q, k, v, o, gate, up, down: the order in which the layer's own forward calls them, and so draws their dropout
    seeds) and the attention's shape."""

    norms: tuple[tuple[torch.Tensor, float], tuple[torch.Tensor, float]]
    projections: tuple[Projection, ...]
    heads: int
    kv_heads: int
    head_dim: int
    scale: float


def fuse_decoder_layers(model: torch.nn.Module) -> int:
    """Run llama-style decoder layers as one `martlet::decoder_layer` op where a call allows it (the patch
    `native_decoder_layer`, after `kernels.fuse_lora` and `native.fuse_native`). Returns how many layers."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in LLAMA_DECODER_LAYERS:
            count += patches.patch_forward("native_decoder_layer", module, _layer_forward)
    return count


def _layer_forward(self, hidden_states, *args, **kwargs):
    found = None if args else _plan(self, hidden_states, kwargs)
    if found is None:
        return self._plain_forward(hidden_states, *args, **kwargs)
    out = _run(hidden_states.view(hidden_states.shape[1:]), *kwargs["position_embeddings"], *found)
    return out.view(hidden_states.shape)


def _run(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: Plan, samples: torch.Tensor,
         factors: list[torch.Tensor]) -> torch.Tensor:
    """`martlet::decoder_layer` (martlet_native.cpp: the op and its autograd node) on a row x (tokens, hidden)."""
    drops = [kernels.native_dropout(p.p) for p in plan.projections]  # (seed, threshold) each, in the layer's order
    projections = plan.projections
    (norm1, eps1), (norm2, eps2) = plan.norms
    return native.ops().decoder_layer(
        x, factors, cos, sin, samples, norm1, norm2, eps1, eps2, [p.copy.forward for p in projections],
        [p.copy.backward for p in projections], [p.bias for p in projections], [p.scaling for p in projections],
        [1 / kernels.native_kept(threshold) for _, threshold in drops], [seed for seed, _ in drops],
        [threshold for _, threshold in drops], plan.heads, plan.kv_heads, plan.scale)


def _plan(layer: Any, x: torch.Tensor, kwargs: dict[str, Any]) -> tuple[Plan, torch.Tensor, list] | None:
    """(plan, the attention's sample table, the LoRA factors) for this call, or None where the layer's own forward
    runs."""
    if (not torch.is_grad_enabled() or kernels.adapters_are_off() or x.dim() != 3 or x.shape[0] != 1
            or native.usable(x) is None or env_switch("MARTLET_FUSED_LAYER") is False
            or any(kwargs.get(k) is not None for k in ("cache", "past_key_values")) or kwargs.get("use_cache")
            or kwargs.get("output_attentions")):
        return None
    attention, mlp = layer.self_attn, layer.mlp
    cos, sin = kwargs.get("position_embeddings") or (None, None)
    if cos is None or not _rotary_fits(x, cos, sin, attention.head_dim):
        return None
    config, norms = attention.config, (layer.input_layernorm, layer.post_attention_layernorm)
    modules = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj,
               mlp.down_proj)
    if not (_patched(attention, "native_rotary") and _patched(mlp, "native_mlp")
            and all(_patched(n, "native_rms_norm") and not n.weight.requires_grad for n in norms)):
        return None
    samples = varlen_attention.fused_row(kwargs.get("position_ids"), x.shape[1], x.dtype, attention.head_dim,
                                         config.num_key_value_heads)
    if samples is None or (kwargs.get("attention_mask") is not None and samples.shape[0] == 1):
        return None  # (one sample with a mask: `varlen_attention` hands it to sdpa)
    longest = int((samples[:, 1] + samples[:, 3]).max())
    if not varlen_attention.reads_shared_prefixes(config, longest, layer.training):
        return None
    projections, factors = _projections(modules, x)
    if projections is None:
        return None
    plan = Plan(tuple((n.weight, n.variance_epsilon) for n in norms), projections, config.num_attention_heads,
                config.num_key_value_heads, attention.head_dim, attention.scaling)
    return plan, samples, factors


def _rotary_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> bool:
    return (not (cos.requires_grad or sin.requires_grad) and cos.shape == sin.shape == (1, x.shape[1], head_dim)
            and native.usable(x, cos, sin) is not None)


def _patched(module: Any, name: str) -> bool:
    return getattr(type(module), "_martlet_patch", None) == name and not _hooked(module)


def _hooked(module: Any) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _projections(modules: tuple[Any, ...], x: torch.Tensor) -> tuple[tuple[Projection, ...] | None, list]:
    """The seven projections' `Projection`s and factors [A, B, A, B, ...], or (None, []) where one of them would not
    run on packed copies on this call."""
    projections, factors = [], []
    for module in modules:
        found = _projection(module, x)
        if found is None:
            return None, []
        projections.append(found[0])
        factors += found[1:]
    return tuple(projections), factors


def _projection(module: Any, x: torch.Tensor) -> tuple[Projection, torch.Tensor, torch.Tensor] | None:
    """(projection, A, B) for a fused LoRA layer that runs `martlet::lora_linear` on this call, or for a frozen plain
    layer that runs `packed.FrozenProduct` (one LoRA does not adapt: empty factors); else None."""
    if _patched(module, "fused_lora"):
        adapter = kernels.fused_adapter(module, x)
        if adapter is None:
            return None
        (name, p), base = adapter, module.base_layer
        scaling, a, b = module.scaling[name], module.lora_A[name].weight, module.lora_B[name].weight
    elif _patched(module, "packed_linear") and packed.computes_in(x, module.weight.dtype):
        base, scaling, p, a, b = module, 0.0, 0.0, _NO_FACTOR, _NO_FACTOR
    else:
        return None
    copy = packed.frozen_copy(base)
    return None if copy is None else (Projection(copy, base.bias, scaling, p), a, b)


_NO_FACTOR = torch.empty(0)  # a projection without an adapter

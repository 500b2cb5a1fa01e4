"""A llama-style decoder layer of a LoRA model as one autograd node on a CPU.

While LoRA trains on a CPU with the native kernels, a decoder layer's forward is a chain of ~20 module calls and
autograd nodes: two RMSNorms, seven LoRA projections, two rotary embeddings, the attention, SwiGLU, two residual
adds, and the views between them, each a module call through transformers' and peft's Python and a node for the
autograd engine. Their kernels are Martlet's own (train/native.py, train/kernels.py), so the layer can run them in
one forward and one hand-written backward: the same kernels in the same order, the gradients summed in the order
autograd sums them, so the same bits (tested against the unfused layer). That takes the Python of ~600 module
calls and the engine's bookkeeping of ~600 nodes out of a SmolLM2 step (1.04-1.055x; docs/en/performance.md).

It runs where every piece of the layer would run on the native kernels anyway: a padding-free row (batch 1) on
the CPU, in bf16 or fp32, gradients on, the norms, MLP and attention fused by `native.fuse_native`, the seven
projections fused LoRA layers (`kernels.fuse_lora`) with one plain adapter each on packed frozen weights
(train/packed.py), the attention `martlet_varlen`'s fused pass, no hooks on the modules it skips. Every other call
(inference, a DPO reference's forward, a cache, other models) runs the layer's own forward. `MARTLET_FUSED_LAYER=0`
turns it off.
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

_PRODUCT = torch.ops.mkldnn._linear_pointwise  # oneDNN's product on a packed weight (patch `packed_weights`)


@dataclass(frozen=True)
class Projection:
    """One fused LoRA projection of the layer: its frozen weight's packed copies, bias, scaling and dropout."""

    copy: packed.PackedWeight
    bias: torch.Tensor | None
    scaling: float
    p: float

    def forward(self, ops: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x W^T + bias + s * dropout(x) A^T B^T, as `martlet::lora_linear` computes it: (out, x A^T, seed)."""
        out = _PRODUCT(x, self.copy.forward, self.bias, "none", [], "")
        seed, threshold = kernels.native_dropout(self.p)
        xa = ops.lora_down(x, a, 1 / kernels.native_kept(threshold), seed, threshold)
        ops.lora_up_(out, xa, b, self.scaling)
        return out, xa, (seed, threshold)

    def backward(self, ops: Any, dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, seed: tuple[int, int], input_grad: bool) -> tuple[torch.Tensor | None, ...]:
        """(x's gradient or None, A's, B's), as the C++ node's backward computes them."""
        grad_x = _PRODUCT(dy, self.copy.backward, None, "none", [], "") if input_grad else None
        dyb, grad_b = ops.lora_up_backward(dy, xa, b, self.scaling)
        keep_scale = 1 / kernels.native_kept(seed[1])
        grad_a = ops.lora_down_backward(x, a, dyb, keep_scale, seed[0], seed[1], grad_x)
        return grad_x, grad_a, grad_b


@dataclass(frozen=True)
class Plan:
    """What a fused layer's call computes with besides its inputs: the norms, the projections (q, k, v, o, gate, up,
    down, in the order the layer's own forward calls them: their dropout seeds are drawn in that order) and the
    attention's shape."""

    norms: tuple[tuple[torch.Tensor, float], tuple[torch.Tensor, float]]
    projections: tuple[Projection, ...]
    heads: int
    kv_heads: int
    head_dim: int
    scale: float


class DecoderLayer(torch.autograd.Function):
    """y = x2 + down(swiglu(gate(n2), up(n2))), n2 = norm2(x2), x2 = x + o(attention(rotary(q(n1)), rotary(k(n1)),
    v(n1))), n1 = norm1(x), for a padding-free row x (tokens, hidden); `factors` the seven LoRA A, B pairs."""

    @staticmethod
    def forward(ctx, x, cos, sin, samples, plan, *factors):
        ops = native.ops()
        q_, k_, v_, o_, gate_, up_, down_ = plan.projections
        tokens, heads, kv_heads, dim = x.shape[0], plan.heads, plan.kv_heads, plan.head_dim
        n1, rstd1 = ops.rms_norm(x, *plan.norms[0])
        q, xq, sq = q_.forward(ops, n1, *factors[0:2])
        k, xk, sk = k_.forward(ops, n1, *factors[2:4])
        v, xv, sv = v_.forward(ops, n1, *factors[4:6])
        q = ops.rotary(q.view(1, tokens, heads, dim), cos, sin, False).view(-1, dim)
        k = ops.rotary(k.view(1, tokens, kv_heads, dim), cos, sin, False).view(-1, dim)
        v = v.view(-1, dim)
        attended, lse = ops.attention(q, k, v, samples, heads, plan.scale)
        attended = attended.view(tokens, heads * dim)
        o, xo, so = o_.forward(ops, attended, *factors[6:8])
        x2 = x + o
        n2, rstd2 = ops.rms_norm(x2, *plan.norms[1])
        gate, xg, sg = gate_.forward(ops, n2, *factors[8:10])
        up, xu, su = up_.forward(ops, n2, *factors[10:12])
        act = ops.swiglu(gate, up)
        down, xd, sd = down_.forward(ops, act, *factors[12:14])
        ctx.save_for_backward(x, rstd1, n1, q, k, v, attended, lse, x2, rstd2, n2, gate, up, act, cos, sin, samples,
                              xq, xk, xv, xo, xg, xu, xd, *factors)
        ctx.plan, ctx.seeds = plan, (sq, sk, sv, so, sg, su, sd)
        return x2 + down

    @staticmethod
    def backward(ctx, grad):
        ops, plan = native.ops(), ctx.plan
        (x, rstd1, n1, q, k, v, attended, lse, x2, rstd2, n2, gate, up, act, cos, sin, samples,
         *downs) = ctx.saved_tensors
        downs, factors = downs[:7], downs[7:]
        tokens, heads, kv_heads, dim = x.shape[0], plan.heads, plan.kv_heads, plan.head_dim
        grads: list[torch.Tensor | None] = [None] * 14

        def back(i: int, dy: torch.Tensor, inp: torch.Tensor, input_grad: bool = True) -> torch.Tensor | None:
            grad_x, grads[2 * i], grads[2 * i + 1] = plan.projections[i].backward(
                ops, dy, inp, downs[i], factors[2 * i], factors[2 * i + 1], ctx.seeds[i], input_grad)
            return grad_x

        dy = grad.to(x.dtype).contiguous()
        d_gate, d_up = ops.swiglu_backward(back(6, dy, act), gate, up)
        dn2 = back(5, d_up, n2)  # autograd's order: a later node's gradient first, the next one added to it
        dn2 = dn2 + back(4, d_gate, n2)
        dx2 = dy + ops.rms_norm_backward(dn2, x2, plan.norms[1][0], rstd2)
        dq, dk, dv = ops.attention_backward(back(3, dx2, attended).view(-1, dim), q, k, v, samples,
                                            attended.view(-1, dim), lse, heads, plan.scale)
        dq = ops.rotary(dq.view(1, tokens, heads, dim), cos, sin, True).view(tokens, -1)
        dk = ops.rotary(dk.view(1, tokens, kv_heads, dim), cos, sin, True).view(tokens, -1)
        need = ctx.needs_input_grad[0]  # the first layer's input (frozen embeddings) needs none
        dn1 = back(2, dv.view(tokens, -1), n1, need)
        dn1 = _summed(dn1, back(1, dk, n1, need))
        dn1 = _summed(dn1, back(0, dq, n1, need))
        dx = dx2 + ops.rms_norm_backward(dn1, x, plan.norms[0][0], rstd1) if need else None
        return dx, None, None, None, None, *grads


def _summed(total: torch.Tensor | None, more: torch.Tensor | None) -> torch.Tensor | None:
    return None if total is None else total + more


def fuse_decoder_layers(model: torch.nn.Module) -> int:
    """Run llama-style decoder layers as one `DecoderLayer` node where a call allows it (the patch
    `native_decoder_layer`, after `kernels.fuse_lora` and `native.fuse_native`). Returns how many layers."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in LLAMA_DECODER_LAYERS:
            count += patches.patch_forward("native_decoder_layer", module, _layer_forward)
    return count


def _layer_forward(self, hidden_states, *args, **kwargs):
    plan = None if args else _plan(self, hidden_states, kwargs)
    if plan is None:
        return self._plain_forward(hidden_states, *args, **kwargs)
    plan, samples, factors = plan
    cos, sin = kwargs["position_embeddings"]
    out = DecoderLayer.apply(hidden_states.view(hidden_states.shape[1:]), cos, sin, samples, plan, *factors)
    return out.view(hidden_states.shape)


def _plan(layer: Any, x: torch.Tensor, kwargs: dict[str, Any]) -> tuple[Plan, torch.Tensor, list] | None:
    """(plan, the attention's sample table, the LoRA factors) for this call, or None where the layer's own forward
    runs."""
    if (not torch.is_grad_enabled() or kernels.adapters_are_off() or x.dim() != 3 or x.shape[0] != 1
            or native.usable(x) is None or env_switch("MARTLET_FUSED_LAYER") is False
            or kwargs.get("past_key_values") is not None or kwargs.get("use_cache") or kwargs.get("output_attentions")):
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
    """The seven fused LoRA projections' `Projection`s and factors [A, B, A, B, ...], or (None, []) where one of them
    would not run `martlet::lora_linear` (its C++ node) on this call."""
    projections, factors = [], []
    for module in modules:
        adapter = kernels.fused_adapter(module, x) if _patched(module, "fused_lora") else None
        base = module.base_layer
        copy = packed._packed_copy(base.weight) if adapter is not None else None
        if copy is None or copy.backward is None or (base.bias is not None and base.bias.requires_grad):
            return None, []
        name, p = adapter
        projections.append(Projection(copy, base.bias, module.scaling[name], p))
        factors += [module.lora_A[name].weight, module.lora_B[name].weight]
    return tuple(projections), factors

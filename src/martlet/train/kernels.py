"""Fused autograd functions in plain torch: fewer operations and no recomputation on the training hot path.

Each one computes what a chain of library modules computes, with its gradients written by hand, so the
autograd graph holds one node instead of a dozen and the backward pass reads only what it needs. They run on
any device (plain torch ops). The equivalence with the unfused computation, values and gradients, is tested
in `tests/unit/test_kernels.py` and `tests/unit/test_batching.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from martlet import patches
from martlet.train import native, packed


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `target`, `chunk` rows at a time.

    The gradients are computed in the forward pass, chunk by chunk (d logits = softmax - one-hot, projected
    back through the weight), so at most one chunk of logits exists at once, none is kept for the backward
    pass and nothing is recomputed there: the backward pass only scales the stored gradients. The projection
    runs in the activations' dtype (bf16 under autocast), the softmax in fp32, as the library's loss does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w, b = cast_head(weight, bias, hidden.dtype)  # once, not per chunk
        for start, h, y, rows in _chunks(hidden, target, chunk, w):  # padding rows: their loss and gradient dropped
            logits = packed.linear(h, w, b)
            kernels = native.usable(logits)
            if kernels is not None:  # one native pass: the losses, and the logits turned into their gradient
                total += kernels.cross_entropy_grad_(logits, y.contiguous())[:rows].sum()
                grad = logits
            else:
                logp = torch.log_softmax(logits.float(), -1)
                total -= logp.gather(1, y[:, None])[:rows].sum()
                grad = logp.exp_()  # the softmax, in place
                grad[torch.arange(len(y), device=y.device), y] -= 1
            grad[rows:] = 0
            if grad_b is not None:
                grad_b += grad.float().sum(0)
            grad = grad.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start:start + chunk] = packed.input_grad(grad, w)[:rows]
            if grad_w is not None:
                grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors

        def scaled(grad, dtype=None):
            return None if grad is None else (grad * grad_total).to(dtype or grad.dtype)

        return scaled(grad_h), scaled(grad_w, ctx.dtypes[0]), scaled(grad_b, ctx.dtypes[1]), None, None


class TokenScores(torch.autograd.Function):
    """Per-token log-probability of `target` under `hidden @ weight.T`, `chunk` rows at a time, with the fields trl's
    fused LM head reports beside it: entropy, mean logit and whether the target is the arg max. As in
    `LinearCrossEntropy`, a chunk's logits become the log-probability's gradient in the forward pass (when `hidden`
    needs one) and only its projection on `hidden` is kept: the backward pass scales its rows. The entropy is
    differentiable too, by recomputing the logits in the backward pass, only when its gradient is used (trl's DPO
    and KTO losses read it as a metric). The weight gets no gradient (frozen: LoRA). `temperature` divides the logits
    (GRPO's sampling temperature), in fp32 after the product, as trl's head does. On a CPU one native pass a chunk
    (`token_scores_`), else torch.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, temperature=1.0):
        need_h = ctx.needs_input_grad[0]
        rows = hidden.shape[0]
        fields = [torch.empty(rows, dtype=torch.float32, device=hidden.device) for _ in range(3)]
        top1 = torch.empty(rows, dtype=torch.bool, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        w, _ = cast_head(weight, None, hidden.dtype)
        for start, h, y, n in _chunks(hidden, target, chunk, w):
            logits = packed.linear(h, w)
            kernels = native.usable(logits)
            if kernels is not None:
                scores = kernels.token_scores_(logits, y.contiguous(), need_h, temperature)
                grad = logits
            else:
                z = _tempered(logits, temperature)
                logp_all = torch.log_softmax(z, -1)
                probs = logp_all.exp()
                scores = (logp_all.gather(1, y[:, None])[:, 0], -(probs * logp_all).sum(-1), z.mean(-1),
                          z.argmax(-1) == y)
                grad = probs
                grad[torch.arange(len(y), device=y.device), y] -= 1
                if temperature != 1.0:
                    grad /= temperature
            for out, value in zip((*fields, top1), scores):
                out[start:start + n] = value[:n]
            if need_h:
                grad_h[start:start + n] = packed.input_grad(grad[:n].to(hidden.dtype), w)
        ctx.save_for_backward(grad_h, hidden if need_h else None, weight if need_h else None, target)
        ctx.chunk, ctx.temperature = chunk, temperature
        ctx.mark_non_differentiable(fields[2], top1)
        ctx.set_materialize_grads(False)
        return fields[0], fields[1], fields[2], top1

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *unused):
        grad_h, hidden, weight, target = ctx.saved_tensors
        if grad_h is None:
            return None, None, None, None, None
        grad_hidden = torch.zeros_like(grad_h) if grad_logp is None else grad_h * (-grad_logp).to(grad_h.dtype)[:, None]
        if grad_entropy is not None and bool(grad_entropy.any()):
            w, _ = cast_head(weight, None, hidden.dtype)
            for start, h, _, n in _chunks(hidden, target, ctx.chunk, w):
                logp_all = torch.log_softmax(_tempered(torch.nn.functional.linear(h[:n], w), ctx.temperature), -1)
                probs = logp_all.exp()
                entropy = -(probs * logp_all).sum(-1, keepdim=True)
                # dH/dz = -p (log p + H), z the tempered logits: d z / d logits = 1 / temperature
                d_logits = probs * (logp_all + entropy) * (-grad_entropy[start:start + n, None] / ctx.temperature)
                grad_hidden[start:start + n] += d_logits.to(hidden.dtype) @ w
        return grad_hidden, None, None, None, None


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits in fp32, divided by the temperature (trl's head: the product's dtype, then the division)."""
    z = logits.float()
    return z / temperature if temperature != 1.0 else z


def _chunks(hidden: torch.Tensor, target: torch.Tensor, chunk: int, weight: torch.Tensor):
    """(start, rows, targets, real rows) of each chunk, rounded up with zero rows (target 0) to a repeating shape
    unless its products run on `weight`'s packed copy, which builds no kernel worth it per shape (`row_multiple`)."""
    multiple = 1 if packed.packed_copy_of(weight) else shape_multiple(hidden.device.type, hidden.dtype)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], target[start:start + chunk]
        n = h.shape[0]
        if -n % multiple:
            h = torch.nn.functional.pad(h, (0, 0, 0, -n % multiple))
            y = torch.nn.functional.pad(y, (0, -n % multiple))
        yield start, h, y, n


def shape_multiple(device_type: str, dtype: torch.dtype, rows: int = 64) -> int:
    """Row counts to round matrix products up to: bf16 / fp16 products on a CPU (oneDNN) build a kernel for every
    new shape, 3 ms for a layer's product and up to 30 ms for the output projection's gradient (measured with
    ONEDNN_VERBOSE=profile_create), which every step paid again when its number of tokens changed. Elsewhere 1."""
    return rows if device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1


def row_multiple(model: torch.nn.Module, device_type: str, dtype: torch.dtype) -> int:
    """What to round a padding-free row of `model` up to: 1 while all its products run on packed weights
    (`packed.products_packed`: in the benchmark's SFT steps rows of any length ran 1.055-1.06x the speed of rows
    rounded to 64 tokens, new lengths' first products included), else `shape_multiple`."""
    return 1 if packed.products_packed(model) else shape_multiple(device_type, dtype)


def cast_head(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """The output projection in the activations' dtype (bf16 under autocast); its logits then go to fp32."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T, the base layer and its LoRA adapter in one autograd node.

    peft runs the base layer, a dropout, two small linear layers, a scaling and a sum: a dozen operations and
    as many autograd nodes per adapted layer, and under autocast two casts of the fp32 adapter weights whose
    gradients are cast back. Here: the base product, and the adapter's two thin products with the dropout; the
    gradients of A and B leave in fp32, the frozen base weight (and bias) get none. On a CPU with the native
    kernels the adapter runs through them (`lora_down`, `lora_up_` and their backward passes: one pass over the
    rows each, the dropout mask drawn on the way and recomputed from its seed backward, fp32 factors); elsewhere
    as torch products in the activations' dtype, the dropout a 0/1 factor (`keep_factor`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout):
        dtype = weight.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = packed.linear(x2, weight, bias)
        kernels = native.usable(x2)
        ctx.scaling, ctx.shape, ctx.native = scaling, shape, kernels is not None
        if kernels is not None:
            seed, threshold = native_dropout(dropout)
            kept = native_kept(threshold)  # 1 / kept goes on the small factors
            xa = kernels.lora_down(x2, lora_a, 1 / kept, seed, threshold)
            kernels.lora_up_(out, xa, lora_b, scaling)
            ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
            ctx.kept, ctx.seed = kept, (seed, threshold)
        else:
            keep, kept = keep_factor(x2.shape, dropout, x2.dtype, x2.device) if dropout > 0 else (None, 1.0)
            xd = x2 * keep if keep is not None else x2
            a = (lora_a / kept).to(dtype)
            b = (lora_b * scaling).to(dtype)
            xa = xd @ a.t()
            out.addmm_(xa, b.t())
            ctx.save_for_backward(xd, xa, weight, a, b, keep)
            ctx.kept = kept
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        # native: the input, the adapter's own A and B; torch: the dropped input, A and B scaled and cast
        x, xa, weight, a, b, *keep = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(weight.dtype)
        grad_x = packed.input_grad(dy, weight) if ctx.needs_input_grad[0] else None
        if ctx.native:
            kernels = native.ops()
            dyb, grad_b = kernels.lora_up_backward(dy.contiguous(), xa, b, ctx.scaling)  # dyb includes the scaling
            grad_a = kernels.lora_down_backward(x, a, dyb, 1 / ctx.kept, *ctx.seed, grad_x)  # and grad_x += its part
        else:
            dyb = dy @ b  # (tokens, r), the scaling included
            if grad_x is not None:
                grad_x = grad_x.addcmul_(dyb @ a, keep[0]) if keep[0] is not None else grad_x.addmm_(dyb, a)
            grad_a = (dyb.t() @ x).float().div_(ctx.kept) if ctx.needs_input_grad[3] else None
            grad_b = (dy.t() @ xa).float().mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        if grad_x is not None:
            grad_x = grad_x.view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def native_dropout(p: float) -> tuple[int, int]:
    """(seed, threshold) of the native kernels' dropout: p in steps of 2^-16, the seed from torch's generator."""
    if p <= 0:
        return 0, 0
    return int(torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64)), round(p * 65536)


def native_kept(threshold: int) -> float:
    """The share of elements the native dropout keeps at `threshold` (of `native_dropout`)."""
    return 1 - threshold / 65536


def keep_factor(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, float]:
    """Dropout as a factor: a tensor of `dtype` holding 1 (kept, probability 1 - p) or 0, and that probability.

    On a CPU, `bernoulli_` draws one random number per element and takes a fifth of a LoRA step at dropout 0.05,
    and boolean masks are slow to apply. Here random 64-bit words are cut into lanes as wide as `dtype`, and
    integer operations turn each lane into the bits of 1.0 or 0.0 of that dtype: p is rounded to 2^-(bits - 1)
    (the caller scales by the rounded keep probability, so the dropout stays unbiased). Other devices use
    `bernoulli_`.
    """
    if device.type != "cpu" or dtype not in _LANES:
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p), 1 - p
    lanes = _LANES[dtype]
    bits = torch.iinfo(lanes).bits
    half = 1 << (bits - 2)  # lanes >> 1 lie in [-half, half): their difference with a threshold cannot overflow
    threshold = round(p * 2 * half) - half
    count, per_word = shape.numel(), 64 // bits
    words = torch.randint(-2**63, 2**63 - 1, ((count + per_word - 1) // per_word,), dtype=torch.int64, device=device)
    lane = words.view(lanes)[:count].bitwise_right_shift_(1)  # in place: the words are not used again
    one = torch.ones((), dtype=dtype).view(lanes).item()
    # (lane - threshold) >> (bits - 1) is -1 where lane < threshold (dropped), else 0; inverted, it masks 1.0's bits
    factor = lane.sub_(threshold).bitwise_right_shift_(bits - 1).bitwise_not_().bitwise_and_(one)
    return factor.view(dtype).view(shape), 1 - (threshold + half) / (2 * half)


_LANES = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def fuse_lora(model: torch.nn.Module) -> int:
    """Run plain LoRA layers (peft's `lora.Linear` on an `nn.Linear`, one adapter, no DoRA, no LoRA bias) through
    `LoraLinear` (the patch `fused_lora` of `martlet.patches`). Whatever the fused path does not cover at call time
    (merged or disabled adapters, per-call adapter names, a dtype other than the base weight's) goes to peft's own
    forward. Returns the count."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    count = 0
    for module in model.modules():
        if (type(module) is PeftLoraLinear and type(module.base_layer) is torch.nn.Linear
                and len(module.lora_A) == 1 and not module.fan_in_fan_out
                and _plain_lora(module, next(iter(module.lora_A)))):
            count += patches.patch_forward("fused_lora", module, _fused_forward)
    return count


def _plain_lora(layer: torch.nn.Module, name: str | None) -> bool:
    """Whether adapter `name` of a peft LoRA layer is one `LoraLinear` computes: plain LoRA (no DoRA, no LoRA bias,
    no other variant) with a plain dropout: what `fuse_lora` asks of a layer's one adapter, and `_fused_forward` of
    the active one (an adapter added later, as trl's GRPO 'ref' copy, is checked when it runs)."""
    return (name is not None and name in layer.lora_A and not layer.use_dora.get(name)
            and not getattr(layer, "lora_bias", {}).get(name) and not getattr(layer, "lora_variant", {}).get(name)
            and isinstance(layer.lora_dropout[name], (torch.nn.Identity, torch.nn.Dropout)))


_ADAPTERS_OFF = contextvars.ContextVar("martlet_adapters_off", default=False)


def adapters_switch_off(model: torch.nn.Module) -> bool:
    """Whether `adapters_off` switches every adapter of `model` off: all its peft layers are Martlet's fused LoRA
    layers and none is merged into its base weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and all(getattr(type(m), "_martlet_patch", None) == "fused_lora" and not m.merged
                                for m in layers)


@contextlib.contextmanager
def adapters_off() -> Iterator[None]:
    """Inside, the fused LoRA layers run their frozen base layer alone: LoRA's reference model, as peft's
    `disable_adapter()` gives it. Only for a model `adapters_switch_off` accepts."""
    token = _ADAPTERS_OFF.set(True)
    try:
        yield
    finally:
        _ADAPTERS_OFF.reset(token)


def adapters_are_off() -> bool:
    """Whether this thread runs inside `adapters_off`."""
    return _ADAPTERS_OFF.get()


def fused_disable_adapter(model: torch.nn.Module) -> bool:
    """Patch `peft_fused_disable_adapter` on a peft model: its `disable_adapter()` context (how trl runs the
    reference of a LoRA policy in DPO and KTO: once a step; GRPO keeps a 'ref' adapter of its own) is
    `adapters_off` while every adapter layer is fused and unmerged, without peft's two walks over the whole model
    and its status report (~40-75 ms a call on SmolLM2); peft's own otherwise. Idempotent; False when the guard
    fails."""
    if getattr(model.disable_adapter, "_martlet_plain", None) is not None:
        return True
    plain = model.disable_adapter

    @contextlib.contextmanager
    def disable_adapter() -> Iterator[None]:
        with adapters_off() if adapters_switch_off(model) else plain():
            yield

    disable_adapter._martlet_plain = plain
    return patches.patch_attribute("peft_fused_disable_adapter", model, "disable_adapter", disable_adapter)


def _fused_forward(self, x, *args, **kwargs):
    base = self.base_layer
    if adapters_are_off() and not self.merged:
        out = None if args or kwargs else packed.frozen_product(base, x)  # (while packed: train/packed.py)
        return out if out is not None else base(x, *args, **kwargs)
    adapter = None if args or kwargs else fused_adapter(self, x)
    if adapter is None:
        return self._plain_forward(x, *args, **kwargs)
    name, p = adapter
    return _lora_linear(x, base, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p)


def fused_adapter(layer: torch.nn.Module, x: torch.Tensor) -> tuple[str, float] | None:
    """(name, dropout p) of the adapter `LoraLinear` computes for a call of fused LoRA layer `layer` on `x`, or None
    where peft's own forward runs: merged or disabled adapters, several active ones, an adapter that is not plain
    LoRA, a compute dtype other than the base weight's. The active one, whichever it is (trl's GRPO switches to a
    'ref' copy for its reference); p is 0 outside training."""
    active = layer.active_adapters
    name = active[0] if len(active) == 1 else None
    if (layer.merged or layer.disable_adapters or not _plain_lora(layer, name)
            or not packed.computes_in(x, layer.base_layer.weight.dtype)):
        return None
    dropout = layer.lora_dropout[name]
    return name, dropout.p if isinstance(dropout, torch.nn.Dropout) and layer.training else 0.0


def _lora_linear(x: torch.Tensor, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float,
                 p: float) -> torch.Tensor:
    """`LoraLinear`, or where its base weight is packed (train/packed.py) and the native kernels run, the same
    computation as one C++ op with its autograd node in C++ (`martlet::lora_linear`): the same kernels in the same
    order, so the same bits (tested), without the Python of either pass (~60 us a layer; a SmolLM2 LoRA step 1.04x)."""
    copy = packed.frozen_copy(base)
    kernels = native.usable(x) if copy is not None else None
    if kernels is None:
        return LoraLinear.apply(x, base.weight, base.bias, a, b, scaling, p)
    seed, threshold = native_dropout(p)
    return kernels.lora_linear(x, copy.forward, copy.backward, base.bias, a, b, scaling, 1 / native_kept(threshold),
                               seed, threshold)

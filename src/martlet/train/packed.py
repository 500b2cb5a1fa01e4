"""Frozen weights packed once for oneDNN's CPU matrix products (LoRA training's base layers and LM head).

torch's CPU product `x @ W^T` hands oneDNN (bf16) or MKL (fp32) a plain row-major weight, and oneDNN copies it into
its blocked layout on every call; MKL's fp32 product ran at ~210 GFLOP/s on an AMD EPYC where oneDNN's reaches
~500. A LoRA base weight never changes while training, so it is packed once into oneDNN's layout
(`torch.ops.mkldnn._reorder_linear_weight`) in two copies, W for the forward product and W^T for the input's
gradient, and the products run `torch.ops.mkldnn._linear_pointwise` on them: bf16 SmolLM2 products 1.05-1.7x
faster at the training shapes (most on the thin k/v projections), fp32 2.4x; a LoRA SFT step 1.09-1.16x
(`benchmarks/sft_throughput.py --baseline martlet-unpacked`). The values are those of torch's own product.

The copies cost twice the packed weights' memory, so `packed_frozen_weights` packs only while training and only
when they fit in an eighth of the machine's memory (`MARTLET_PACKED_WEIGHTS=0` / `1` forces off / on); each copy
remembers its weight's storage and version, and a weight changed since runs torch's product.

Inference (`pack_for_inference`, called by `infer/load.py` on a CPU) keeps one copy, W, of every plain linear layer
outside a peft adapter layer (peft merges an adapter into its base weight through `.data`, which changes neither
storage nor version): generation on SmolLM2 1.13-1.17x the tokens/s in bf16, 1.9-2.3x in fp32
(`benchmarks/infer_throughput.py --rounds 3`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from martlet import patches
from martlet.train import native
from martlet.utils import env_switch

logger = logging.getLogger("martlet")

DTYPES = (torch.bfloat16, torch.float32)
MEMORY_SHARE = 8  # the copies may take up to 1/8 of the machine's memory


@dataclass(frozen=True)
class PackedWeight:
    """One frozen weight in oneDNN's blocked layout: `forward` computes x W^T, `backward` dy W (None: inference)."""

    forward: torch.Tensor
    backward: torch.Tensor | None
    storage: int  # the weight's data_ptr and version when packed: a changed weight is not this one any more
    version: int

    @classmethod
    def of(cls, weight: torch.Tensor, rows: int = 256, backward: bool = True) -> PackedWeight:
        w = weight.detach()
        transposed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), rows) if backward else None
        return cls(torch.ops.mkldnn._reorder_linear_weight(w, rows), transposed, w.data_ptr(), weight._version)

    def fits(self, weight: torch.Tensor) -> bool:
        return weight.data_ptr() == self.storage and weight._version == self.version


def _packed_copy(weight: torch.Tensor) -> PackedWeight | None:
    """The weight's packed copy, if it has one that fits it (none under torch.compile: its graphs hold the ops)."""
    if torch.compiler.is_compiling():
        return None
    packed = weight.__dict__.get("_martlet_packed")
    return packed if packed is not None and packed.fits(weight) else None


def packed_copy_of(weight: torch.Tensor) -> bool:
    """Whether the weight has a packed copy that fits it."""
    return _packed_copy(weight) is not None


def _on_copy(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.forward, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for 2-D x: on the weight's packed copy while it has one that still fits, else torch's product."""
    packed = _packed_copy(weight)
    return _on_copy(x, packed, bias) if packed is not None else torch.nn.functional.linear(x, weight, bias)


def input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dy W, the input's gradient of x W^T, for 2-D dy: on the weight's packed copy when it has one that fits."""
    packed = _packed_copy(weight)
    if packed is not None and packed.backward is not None:
        return torch.ops.mkldnn._linear_pointwise(dy.contiguous(), packed.backward, None, "none", [], "")
    return dy @ weight


def compute_dtype(device_type: str, otherwise: torch.dtype) -> torch.dtype:
    """The dtype a product on `device_type` runs in: autocast's while it is on (it casts the operands), else
    `otherwise`."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else otherwise


def computes_in(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a layer with `dtype` weights computes on `x` in `dtype` (x's own, and autocast's if it is on)."""
    return x.dtype == dtype and compute_dtype(x.device.type, dtype) == dtype


def frozen_product(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """`layer(x)` on its weight's packed copy, or None where that does not apply: no copy (or a stale one), another
    compute dtype, or x's gradient asked for where the copy has no W^T or the layer's weight or bias trains."""
    if not computes_in(x, layer.weight.dtype):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if x.requires_grad and torch.is_grad_enabled():
        if frozen_copy(layer) is None:
            return None
        out = FrozenProduct.apply(x2, layer.weight, layer.bias)
    else:
        packed = _packed_copy(layer.weight)
        if packed is None:
            return None
        out = _on_copy(x2, packed, layer.bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def frozen_copy(layer: torch.nn.Linear) -> PackedWeight | None:
    """The packed copy that `layer`'s product and its input's gradient both run on (W and W^T), or None: no copy (or
    a stale one), one without W^T (inference's), or the layer's weight or bias training."""
    packed = _packed_copy(layer.weight)
    bias = layer.bias
    if (packed is None or packed.backward is None or layer.weight.requires_grad
            or (bias is not None and bias.requires_grad)):
        return None
    return packed


class FrozenProduct(torch.autograd.Function):
    """x W^T + b for 2-D x on a frozen weight's packed copy, x's gradient dy W on its W^T copy (a frozen layer
    beside LoRA's adapted ones, in training): the values of torch's product and its input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # (a frozen parameter: alive anyway, no copy kept)
        return _on_copy(x, _packed_copy(weight), bias)

    @staticmethod
    def backward(ctx, dy):
        return input_grad(dy.reshape(-1, dy.shape[-1]).to(ctx.weight.dtype), ctx.weight), None, None


def linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A plain `nn.Linear`'s forward (patch `packed_linear`): `frozen_product` where it applies, else its own."""
    out = frozen_product(self, x)
    return out if out is not None else self._plain_forward(x)


def probe(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """(packed, torch's, what) products on a tiny input of `dtype`, bias or not: what the patches' guard compares."""
    generator = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(40, k, generator=generator).to(dtype) for k in (24, 40))
    weight, bias = torch.randn(40, 24, generator=generator).to(dtype), torch.randn(40, generator=generator).to(dtype)
    want = torch.nn.functional.linear(x, weight, bias), dy @ weight
    weight._martlet_packed = PackedWeight.of(weight)
    return [(linear(x, weight, bias), want[0], "the packed product"),
            (input_grad(dy, weight), want[1], "the packed product's input gradient")]


def usable(dtype: torch.dtype) -> bool:
    """Whether the packed products run for `dtype` here (patch `packed_weights`' guard, once per dtype)."""
    return patches.usable("packed_weights", (dtype, probe), key=dtype)


def wanted(nbytes: int) -> bool:
    """Whether to make packed copies of `nbytes` in all: `MARTLET_PACKED_WEIGHTS=0` never, `1` always, unset: on x86
    CPUs (AVX2 and up: where they were measured faster than torch; ARM is unmeasured) when they fit in 1/8 of the
    machine's memory."""
    setting = env_switch("MARTLET_PACKED_WEIGHTS")
    if setting is not None:
        return setting
    if not _measured_cpu():
        return False
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return nbytes <= memory // MEMORY_SHARE


def _measured_cpu() -> bool:
    """An x86 CPU with AVX2 or more: where the packed products were measured faster than torch's (AMD EPYC with
    AVX512-BF16; AVX2 emulated on it)."""
    return "avx2" in native.cpu_features()


def frozen_cpu_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights worth packing for training LoRA: the frozen base weights of the fused LoRA layers
    (`kernels.fuse_lora`), and the frozen plain linear layers' (the LM head, the projections LoRA does not adapt),
    on a CPU in a packable dtype. None without fused LoRA layers."""
    fused = [m for m in model.modules() if getattr(type(m), "_martlet_patch", None) == "fused_lora"]
    if not fused:
        return []
    weights = [m.base_layer.weight for m in fused] + [m.weight for m in _frozen_linears(model)]
    unique = list({id(w): w for w in weights}.values())  # (a tied head shares the embeddings' weight)
    return [w for w in unique if _packable(w) and not w.requires_grad]


def _frozen_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The plain linear layers of `model` outside peft's adapter layers (whose base layers the fused LoRA layers
    run), with frozen weights and biases."""
    adapted = {id(sub) for m in model.modules() if hasattr(m, "lora_A") for sub in m.modules()}
    return [m for m in model.modules() if _plain_linear(m) and id(m) not in adapted and not m.weight.requires_grad
            and (m.bias is None or not m.bias.requires_grad)]


def _packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in DTYPES


def _output_layer(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when it is a plain `nn.Linear` (its forward can take `linear_forward`)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if _plain_linear(head) else None


def _plain_linear(module: object) -> bool:
    return type(module) is torch.nn.Linear or getattr(type(module), "_martlet_patch", None) == "packed_linear"


@contextlib.contextmanager
def packed_frozen_weights(model: torch.nn.Module) -> Iterator[int]:
    """Inside, the fused LoRA layers of `model` on a CPU run their base products, and its frozen plain linear layers
    theirs (the LM head: Martlet's loss, token scores, generation without gradients (GRPO's); the projections LoRA
    does not adapt, forward and input gradient: `FrozenProduct`), on packed copies of their frozen weights (each
    weight's `_martlet_packed`, dropped at the end); yields how many weights have them."""
    weights = frozen_cpu_weights(model)
    nbytes = sum(w.nbytes for w in weights)
    if not weights or not wanted(2 * nbytes) or not all(usable(d) for d in {w.dtype for w in weights}):
        yield 0
        return
    for w in weights:
        w._martlet_packed = PackedWeight.of(w)
    for layer in _frozen_linears(model):  # the LM head, and the projections LoRA does not adapt
        if packed_copy_of(layer.weight):
            patches.patch_forward("packed_linear", layer, linear_forward, guarded=(layer.weight.dtype, probe))
    head = _output_layer(model)
    if head is not None and _every_product_packed(model):  # (marked on the head: a wrapper and its model share it)
        head.weight._martlet_products_packed = True
    logger.debug("frozen weights packed for oneDNN: %d, %.0f MB", len(weights), 2 * nbytes / 2**20)
    try:
        yield len(weights)
    finally:
        for w in weights:
            w.__dict__.pop("_martlet_packed", None)
        if head is not None:
            head.weight.__dict__.pop("_martlet_products_packed", None)


def products_packed(model: torch.nn.Module) -> bool:
    """Whether `model` is inside `packed_frozen_weights` with every matrix product of its forward and backward passes
    that oneDNN would build a kernel for at each new number of rows running on a packed copy or in the native LoRA
    kernels. A packed product's first call at a new row count costs ~0.5 ms more, a whole SmolLM2 LoRA step ~6 ms
    (measured), where rounding rows up to 64 tokens (`kernels.shape_multiple`) cost 5-6% of every step: such a
    model's rows need no rounding (`kernels.row_multiple`)."""
    head = _output_layer(model)
    return head is not None and head.weight.__dict__.get("_martlet_products_packed", False)


def _every_product_packed(model: torch.nn.Module) -> bool:
    """Every module's own weight matrices packed (embeddings aside: a lookup, no product), the fused LoRA layers'
    factors aside while the native kernels run them. Anything else (a trainable head, a convolution, a factor on
    torch's products) runs a plain product."""
    factors = set()
    if native.ops() is not None and not native.attention_only():
        fused = [m for m in model.modules() if getattr(type(m), "_martlet_patch", None) == "fused_lora"]
        factors = {id(p) for m in fused for p in [*m.lora_A.parameters(), *m.lora_B.parameters()]}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for weight in module.parameters(recurse=False):
            if weight.dim() >= 2 and id(weight) not in factors and not packed_copy_of(weight):
                return False
    return True


def pack_for_inference(model: torch.nn.Module) -> int:
    """Pack the forward products of `model`'s plain linear layers on a CPU (patch `packed_linear`; one copy each,
    within the memory share `wanted` allows) for generation: bf16 SmolLM2 products at 1-8 rows 1.3-2x faster, the LM
    head 1.8-2x; fp32 up to 5x. A peft adapter layer's parts stay as they are (peft merges an adapter into its base
    weight through `.data`, which a packed copy would not see; a layer an adapter wrapped after an earlier call gives
    its copy back). Idempotent. Returns how many layers are packed."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # (peft is a dependency; without it nothing is adapted)
        BaseTunerLayer = ()
    adapted = {id(sub) for m in model.modules() if isinstance(m, BaseTunerLayer) for sub in m.modules()}
    for m in model.modules():  # a layer wrapped by an adapter since it was packed (serve's --lora_modules) unpacks
        if id(m) in adapted and isinstance(m, torch.nn.Linear):
            m.weight.__dict__.pop("_martlet_packed", None)
    layers = [m for m in model.modules() if _plain_linear(m) and id(m) not in adapted and _packable(m.weight)]
    if not layers or not wanted(sum(m.weight.nbytes for m in layers)):
        return 0
    count = 0
    for m in layers:
        if packed_copy_of(m.weight):  # (packed by an earlier call)
            count += 1
        elif patches.patch_forward("packed_linear", m, linear_forward, guarded=(m.weight.dtype, probe)):
            m.weight._martlet_packed = PackedWeight.of(m.weight, rows=16, backward=False)
            count += 1
    return count

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
remembers its weight's storage and version, and a weight changed since (or merged into) runs torch's product.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from martlet import patches
from martlet.utils import env_switch

logger = logging.getLogger("martlet")

DTYPES = (torch.bfloat16, torch.float32)
MEMORY_SHARE = 8  # the copies may take up to 1/8 of the machine's memory


@dataclass(frozen=True)
class PackedWeight:
    """One frozen weight in oneDNN's blocked layout twice: `forward` computes x W^T, `backward` dy W."""

    forward: torch.Tensor
    backward: torch.Tensor
    storage: int  # the weight's data_ptr and version when packed: a changed weight is not this one any more
    version: int

    @classmethod
    def of(cls, weight: torch.Tensor, rows: int = 256) -> PackedWeight:
        w = weight.detach()
        return cls(torch.ops.mkldnn._reorder_linear_weight(w, rows),
                   torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), rows), w.data_ptr(), weight._version)

    def fits(self, weight: torch.Tensor) -> bool:
        return weight.data_ptr() == self.storage and weight._version == self.version


def _packed_copy(weight: torch.Tensor) -> PackedWeight | None:
    """The weight's packed copy, if it has one that fits it (none under torch.compile: its graphs hold the ops)."""
    if torch.compiler.is_compiling():
        return None
    packed = weight.__dict__.get("_martlet_packed")
    return packed if packed is not None and packed.fits(weight) else None


def has_copy(weight: torch.Tensor) -> bool:
    return _packed_copy(weight) is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for 2-D x: on the weight's packed copy while it has one that still fits, else torch's product."""
    packed = _packed_copy(weight)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.forward, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dy W, the input's gradient of x W^T, for 2-D dy: on the weight's packed copy when it has one that fits."""
    packed = _packed_copy(weight)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(dy.contiguous(), packed.backward, None, "none", [], "")
    return dy @ weight


def guard(dtype: torch.dtype) -> None:
    """The ops exist, and give torch's product (and the input's gradient) on a tiny input of `dtype`, bias or not."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        patches.expect(mkldnn is not None and hasattr(mkldnn, name), f"torch.ops.mkldnn has no {name}")
    patches.expect(torch.backends.mkldnn.is_available(), "torch is built without oneDNN")
    generator = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(40, k, generator=generator).to(dtype) for k in (24, 40))
    weight, bias = torch.randn(40, 24, generator=generator).to(dtype), torch.randn(40, generator=generator).to(dtype)
    want = torch.nn.functional.linear(x, weight, bias), dy @ weight
    weight._martlet_packed = PackedWeight.of(weight)
    patches.expect_close(linear(x, weight, bias), want[0], "the packed product", 1e-2)
    patches.expect_close(input_grad(dy, weight), want[1], "the packed product's input gradient", 1e-2)


def wanted(nbytes: int) -> bool:
    """`MARTLET_PACKED_WEIGHTS=0` never, `1` always, unset: when the copies fit in 1/8 of the machine's memory."""
    setting = env_switch("MARTLET_PACKED_WEIGHTS")
    if setting is not None:
        return setting
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return 2 * nbytes <= memory // MEMORY_SHARE


def frozen_cpu_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights worth packing: the frozen base weights of the fused LoRA layers (`kernels.fuse_lora`) and the
    frozen LM head's, on a CPU in a packable dtype."""
    weights = [m.base_layer.weight for m in model.modules() if getattr(type(m), "_martlet_patch", None) == "fused_lora"]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if weights and isinstance(getattr(head, "weight", None), torch.Tensor):
        weights.append(head.weight)
    return [w for w in weights if w.device.type == "cpu" and w.dtype in DTYPES and not w.requires_grad]


@contextlib.contextmanager
def packed_frozen_weights(model: torch.nn.Module) -> Iterator[int]:
    """Inside, the fused LoRA layers of `model` on a CPU run their base products, and Martlet's loss its LM head, on
    packed copies of their frozen weights (each weight's `_martlet_packed`, dropped at the end); yields how many."""
    weights = frozen_cpu_weights(model)
    nbytes = sum(w.nbytes for w in weights)
    if not weights or not wanted(nbytes) or not all(patches.usable("packed_weights", d, key=d)
                                                    for d in {w.dtype for w in weights}):
        yield 0
        return
    for w in weights:
        w._martlet_packed = PackedWeight.of(w)
    logger.debug("frozen weights packed for oneDNN: %d, %.0f MB", len(weights), 2 * nbytes / 2**20)
    try:
        yield len(weights)
    finally:
        for w in weights:
            w.__dict__.pop("_martlet_packed", None)

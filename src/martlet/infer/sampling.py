"""Sampling one token per row on a CPU without torch's `multinomial`.

transformers' generation samples each step's next tokens with `torch.multinomial(probs, num_samples=1)`. On a CPU
that draws an exponential variate for every entry of the vocabulary (`exponential_`): 5.8-6.1 ms a step for 8 rows of
SmolLM2's 49,152 tokens here, ~10% of GRPO's generation and ~4% of a batch-of-one decoding step. Inverse-CDF
sampling draws one uniform number a row and finds it in the running sum of the row's probabilities, in float64 (so
a token's share is its probability to ~1e-16, and a token of probability 0 is never drawn): 1.7 ms, plus 0.45 ms
for the checks that send rows torch would refuse (negative, infinite or NaN entries, a zero sum) to torch's own
`multinomial` and its error. The same distribution, drawn from torch's default generator, so a seeded run repeats
itself (it draws other tokens than torch's `multinomial` would for the same seed).

Patch `fast_cpu_sampling` (`martlet.patches`): the generation module's `torch` global becomes a view of torch whose
`multinomial` takes those calls (one sample a row of a 2-D CPU float tensor, no generator, no `out`) and hands every
other call, and every other name, to torch. Installed by the transformers engine and by GRPO.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from martlet import patches


def inverse_cdf_sample(probs: torch.Tensor) -> torch.Tensor:
    """One index a row of (rows, vocabulary) non-negative weights with a positive sum, drawn with probability
    weight / sum: (rows, 1) int64, as `torch.multinomial(probs, 1)` returns."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    # the first place where the running sum passes u: a zero weight (an unchanged sum) is never that place
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)


def takes(probs: Any, num_samples: int, generator: Any, out: Any) -> bool:
    """Whether `inverse_cdf_sample` gives what `torch.multinomial(probs, num_samples, generator=..., out=...)` would,
    with or without replacement (one sample a row): one sample a row of valid 2-D CPU float weights."""
    if (num_samples != 1 or generator is not None or out is not None or not isinstance(probs, torch.Tensor)
            or probs.dim() != 2 or probs.device.type != "cpu" or not probs.is_floating_point() or probs.numel() == 0):
        return False
    return bool(torch.isfinite(probs).all() and (probs >= 0).all() and (probs.sum(-1) > 0).all())


class SamplingTorch(types.ModuleType):
    """torch, but for `multinomial` calls that `takes` accepts (see the module's docstring)."""

    def __init__(self, original: types.ModuleType):
        super().__init__(original.__name__, original.__doc__)
        self.__dict__["_martlet_torch"] = original

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_martlet_torch"], name)

    def multinomial(self, input: Any, num_samples: int, replacement: bool = False, *, generator: Any = None,
                    out: Any = None) -> Any:
        if takes(input, num_samples, generator, out):
            return inverse_cdf_sample(input)
        return self.__dict__["_martlet_torch"].multinomial(input, num_samples, replacement, generator=generator,
                                                           out=out)


def install() -> bool:
    """Patch `fast_cpu_sampling` (once per process); False when its guard refused the generation module."""
    from transformers.generation import utils

    return patches.patch_global("fast_cpu_sampling", utils, "torch", SamplingTorch)

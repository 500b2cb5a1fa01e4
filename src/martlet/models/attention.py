"""Attention implementation checks (`--use_flash_attn`, `--attn_impl`)."""

from __future__ import annotations

import importlib.util

from martlet.errors import MartletError


def check_flash_attn() -> None:
    """flash-attention 2 needs a CUDA GPU (Ampere or newer) and the flash-attn package."""
    import torch

    if not torch.cuda.is_available():
        raise MartletError("flash-attention needs a CUDA GPU; none is visible.", field="use_flash_attn",
                           hint="Leave --use_flash_attn off (sdpa is used) on this machine.")
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        raise MartletError("flash-attention 2 needs an Ampere or newer GPU (A10, A100, 3090, H100...).",
                           field="use_flash_attn")
    if importlib.util.find_spec("flash_attn") is None:
        raise MartletError("--use_flash_attn needs the flash-attn package.", field="use_flash_attn",
                           hint="pip install flash-attn --no-build-isolation")

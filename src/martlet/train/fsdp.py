"""`--fsdp`: PyTorch's fully sharded data parallel (FSDP2), run by transformers' Trainer through accelerate.

The option words are those users know from transformers' `--fsdp`; they become FSDP2 settings here
(`reshard_after_forward`, `cpu_offload`), passed as `fsdp=True` + `fsdp_config` (the form transformers keeps).
"""

from __future__ import annotations

import json
import os
from typing import Any

from martlet.errors import MartletError

OPTIONS = {"full_shard": ("reshard_after_forward", True), "shard_grad_op": ("reshard_after_forward", False),
           "offload": ("cpu_offload", True), "auto_wrap": (None, None)}
DEFAULT = "full_shard auto_wrap"


def resolve_fsdp(value: str, config_file: str | None = None) -> dict[str, Any]:
    """transformers' `fsdp_config` for FSDP2, checked; errors name the option or the file."""
    words = (DEFAULT if value.strip().lower() == "true" else value.replace(",", " ")).split()
    for word in words or [value]:
        if word not in OPTIONS:
            hint = " (FSDP1-only strategies such as hybrid_shard are not offered)" if "shard" in word else ""
            raise MartletError(f"unknown FSDP option {word!r}: use {', '.join(OPTIONS)} or true{hint}.", field="fsdp")
    config: dict[str, Any] = {"version": 2, "reshard_after_forward": True}
    for word in words:
        key, setting = OPTIONS[word]
        if key:
            config[key] = setting
    if config_file:
        if not os.path.isfile(config_file):
            raise MartletError("FSDP config file not found.", file=config_file, field="fsdp_config")
        try:
            with open(config_file, encoding="utf-8") as fh:
                loaded = json.load(fh)
        except json.JSONDecodeError as exc:
            raise MartletError(f"malformed JSON: {exc.msg}.", file=config_file, line=exc.lineno) from None
        if not isinstance(loaded, dict):
            raise MartletError("an FSDP config must be a JSON object.", file=config_file)
        config.update(loaded)
    return config

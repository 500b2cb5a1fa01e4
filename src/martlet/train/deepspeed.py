"""DeepSpeed configs shipped with Martlet (`--deepspeed default-zero2` ...) or a user's JSON file."""

from __future__ import annotations

import json
import os
from typing import Any

from martlet.errors import MartletError
from martlet.errors import require_package as needs_package

_CONFIGS = {
    "default-zero2": {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}},
    "default-zero3": {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                            "stage3_gather_16bit_weights_on_model_save": True}},
    "zero2-offload": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}},
    "zero3-offload": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                            "offload_param": {"device": "cpu", "pin_memory": True},
                                            "stage3_gather_16bit_weights_on_model_save": True}},
}
_COMMON = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}


def resolve_deepspeed(name: str, *, require_package: bool = True) -> dict[str, Any]:
    """The config dict for a shipped name or a JSON file; errors name the file or the package."""
    if name in _CONFIGS:
        config = {**_COMMON, **json.loads(json.dumps(_CONFIGS[name]))}
    elif os.path.isfile(name):
        try:
            with open(name, encoding="utf-8") as fh:
                config = json.load(fh)
        except json.JSONDecodeError as exc:
            raise MartletError(f"malformed DeepSpeed config: {exc.msg}.", file=name, line=exc.lineno) from None
        if not isinstance(config, dict) or "zero_optimization" not in config:
            raise MartletError("a DeepSpeed config needs a 'zero_optimization' section.", file=name)
    else:
        raise MartletError(f"unknown DeepSpeed config '{name}': use one of {', '.join(_CONFIGS)} or a JSON file.",
                           field="deepspeed")
    if require_package:
        needs_package("deepspeed", "--deepspeed needs the deepspeed package.", field="deepspeed",
                      hint="pip install 'martlet[deepspeed]'")
    return config

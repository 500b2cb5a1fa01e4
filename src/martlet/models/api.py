"""The spec's model helpers: `get_model_tokenizer` and `get_default_template_type`."""

from __future__ import annotations

from typing import Any

from martlet.models.loader import load_model, load_tokenizer, resolve_model
from martlet.models.registry import get_model_info


def get_default_template_type(model_type: str) -> str:
    """The registry's template for a model type (the tokenizer's own template is used when it has one)."""
    return get_model_info(model_type).template


def get_model_tokenizer(model_type: str | None = None, torch_dtype: Any = None, model_kwargs: dict | None = None,
                        load_model_: bool = True, *, model_id_or_path: str | None = None,
                        trust_remote_code: bool = False, **kwargs: Any):
    """(model, tokenizer) for a model type or folder; `model_kwargs` go to `from_pretrained` (device_map...)."""
    import torch

    spec = resolve_model(model_type, model_id_or_path, check_model_is_latest=kwargs.pop("check_model_is_latest", True))
    tokenizer = load_tokenizer(spec.model_dir, trust_remote_code=trust_remote_code)
    if not load_model_ or not kwargs.pop("load_model", True):
        return None, tokenizer
    model_kwargs = dict(model_kwargs or {})
    device_map = model_kwargs.pop("device_map", None)
    if device_map == "auto" and not torch.cuda.is_available():
        device_map = None  # one CPU: no dispatch hooks needed
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", None: "fp32"}.get(torch_dtype, "fp32")
    if torch_dtype is None and torch.cuda.is_available():
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    model = load_model(spec, dtype=name, device_map=device_map, trust_remote_code=trust_remote_code, **model_kwargs)
    model.model_type = spec.model_type
    model.model_dir = spec.model_dir
    return model, tokenizer

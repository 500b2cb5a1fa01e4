"""The spec's model helpers: `get_model_tokenizer` and `get_default_template_type`."""

from __future__ import annotations

from typing import Any

from martlet.errors import MartletError, did_you_mean
from martlet.models import loader
from martlet.models.registry import get_model_info

_KEYWORDS = ("model_type", "torch_dtype", "model_kwargs", "load_model", "model_id_or_path", "trust_remote_code",
             "check_model_is_latest")


def get_default_template_type(model_type: str) -> str:
    """The registry's template for a model type (the tokenizer's own template is used when it has one)."""
    return get_model_info(model_type).template


def get_model_tokenizer(model_type: str | None = None, torch_dtype: Any = None, model_kwargs: dict | None = None,
                        load_model: bool = True, *, model_id_or_path: str | None = None,
                        trust_remote_code: bool = False, check_model_is_latest: bool = True, **unknown: Any):
    """(model, tokenizer) for a model type or folder; `model_kwargs` go to `from_pretrained` (device_map...).
    With `load_model=False` the model is None. Any other keyword is an error (with a "did you mean")."""
    if unknown:
        name = next(iter(unknown))
        raise MartletError(f"get_model_tokenizer() got an unknown keyword '{name}'.{did_you_mean(name, _KEYWORDS)}",
                           field=name, hint=f"It accepts: {', '.join(_KEYWORDS)}; loading options such as "
                                            "device_map go in model_kwargs.")
    import torch

    spec = loader.resolve_model(model_type, model_id_or_path, check_model_is_latest=check_model_is_latest)
    tokenizer = loader.load_tokenizer(spec.model_dir, trust_remote_code=trust_remote_code)
    if not load_model:
        return None, tokenizer
    model_kwargs = dict(model_kwargs or {})
    device_map = model_kwargs.pop("device_map", None)
    if device_map == "auto" and not torch.cuda.is_available():
        device_map = None  # one CPU: no dispatch hooks needed
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", None: "fp32"}.get(torch_dtype, "fp32")
    if torch_dtype is None and torch.cuda.is_available():
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    model = loader.load_model(spec, dtype=name, device_map=device_map, trust_remote_code=trust_remote_code,
                              **model_kwargs)
    model.model_type = spec.model_type
    model.model_dir = spec.model_dir
    return model, tokenizer

"""The model registry: model types, their hub ids, template and default LoRA targets, read from
`registry.json` on first use (not at import). `register_model` adds entries at run time."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

from martlet.errors import MartletError, did_you_mean

_REGISTRY_FILE = os.path.join(os.path.dirname(__file__), "registry.json")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One registry entry."""

    model_type: str
    hf_id: str | None = None
    ms_id: str | None = None
    template: str = "default"
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    quantization: str | None = None
    requires: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1)
def _builtin() -> tuple[dict[str, ModelInfo], dict[str, str]]:
    with open(_REGISTRY_FILE, encoding="utf-8") as fh:
        data = json.load(fh)
    models = {name: _info(name, entry) for name, entry in data["models"].items()}
    return models, dict(data.get("aliases", {}))


_extra: dict[str, ModelInfo] = {}


def _info(name: str, entry: dict[str, Any]) -> ModelInfo:
    fields = {f.name for f in dataclasses.fields(ModelInfo)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in entry.items() if k in fields}
    return ModelInfo(model_type=name, **{k: v for k, v in kwargs.items() if k != "model_type"})


def all_models() -> dict[str, ModelInfo]:
    models, _ = _builtin()
    return {**models, **_extra}


def register_model(model_type: str, hf_id: str | None = None, *, ms_id: str | None = None,
                   template: str = "default", lora_target_modules: list[str] | None = None,
                   exist_ok: bool = False, **kwargs: Any) -> ModelInfo:
    """Add a model type at run time; it then works everywhere a built-in one does."""
    if model_type in all_models() and not exist_ok:
        raise MartletError(f"model type '{model_type}' is already registered.", hint="Pass exist_ok=True to replace it.")
    entry = dict(kwargs, hf_id=hf_id, ms_id=ms_id, template=template)
    if lora_target_modules is not None:
        entry["lora_target_modules"] = lora_target_modules
    info = _info(model_type, entry)
    _extra[model_type] = info
    return info


def get_model_info(model_type: str) -> ModelInfo:
    models = all_models()
    if model_type in models:
        return models[model_type]
    _, aliases = _builtin()
    if model_type in aliases:
        return models[aliases[model_type]]
    normalized = model_type.lower().replace("_", "-")
    if normalized in models:
        return models[normalized]
    raise MartletError(f"unknown model type '{model_type}'.{did_you_mean(normalized, models)}",
                       field="model_type", hint="`martlet list-models` lists the registered ones.")


def find_by_hub_id(hub_id: str) -> ModelInfo | None:
    key = hub_id.strip("/").lower()
    for info in all_models().values():
        if key in {(info.hf_id or "").lower(), (info.ms_id or "").lower()}:
            return info
    return None


class _ModelTypeMeta(type):
    def __getattr__(cls, attr: str) -> str:
        if attr.startswith("__"):
            raise AttributeError(attr)
        models = all_models()
        # '-' and '.' are spelled '_': qwen2_5_7b_instruct is 'qwen2.5-7b-instruct'
        for model_type in models:
            if model_type.replace(".", "_").replace("-", "_") == attr:
                return model_type
        raise AttributeError(f"ModelType has no '{attr}'.{did_you_mean(attr.replace('_', '-'), models)}")

    def __dir__(cls) -> list[str]:
        return sorted(m.replace(".", "_").replace("-", "_") for m in all_models())


class ModelType(metaclass=_ModelTypeMeta):
    """`ModelType.qwen_7b_chat == 'qwen-7b-chat'`: attribute names are model types with '_' for '-' and '.'."""

    @staticmethod
    def get_model_name_list() -> list[str]:
        return sorted(all_models())

"""Resolve a model (registry name, hub id or local folder) to a local folder, then load it."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from martlet.errors import MartletError
from martlet.models.dtype import torch_dtype
from martlet.models.embedded import EMBEDDED_MODEL_TYPE, embedded_model_dir
from martlet.models.registry import ModelInfo, all_models, find_by_hub_id, get_model_info


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A resolved model: what it is (model_type, registry info) and where its files are."""

    model_type: str
    model_dir: str
    info: ModelInfo | None

    @property
    def template_type(self) -> str:
        return self.info.template if self.info else "default"


def _is_offline(check_model_is_latest: bool) -> bool:
    return (not check_model_is_latest) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def download(hub_id: str, *, revision: str | None = None, token: str | None = None,
             local_only: bool = False, use_modelscope: bool | None = None) -> str:
    """A local snapshot of `hub_id` (Hugging Face, or ModelScope when it is installed and asked for)."""
    if use_modelscope is None:
        use_modelscope = os.environ.get("USE_MODELSCOPE_HUB", "0") == "1"
    if use_modelscope:
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise MartletError("USE_MODELSCOPE_HUB=1 needs the modelscope package.",
                               hint="pip install 'martlet[modelscope]'") from None
        return ms_download(hub_id, revision=revision or "master", local_files_only=local_only)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(hub_id, revision=revision, token=token, local_files_only=local_only,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                 "*.py", "*.tiktoken"])
    except LocalEntryNotFoundError:
        raise MartletError(
            f"model '{hub_id}' is not in the local cache and the hub cannot be reached (offline).",
            field="model_id_or_path",
            hint="Download it first (huggingface-cli download ID), or pass a local folder with "
                 "--model_id_or_path DIR.") from None
    except Exception as exc:  # network errors come in many classes
        raise MartletError(f"cannot download model '{hub_id}': {exc}", field="model_id_or_path",
                           hint="Check the id and your network, or pass a local folder.") from None


def resolve_model(model_type: str | None = None, model_id_or_path: str | None = None, *,
                  check_model_is_latest: bool = True, revision: str | None = None,
                  hub_token: str | None = None) -> ModelSpec:
    """Where the weights are and which model type they are. Nothing given: the embedded SmolLM2."""
    info = get_model_info(model_type) if model_type else None
    if model_id_or_path and os.path.isdir(os.path.expanduser(model_id_or_path)):
        path = os.path.abspath(os.path.expanduser(model_id_or_path))
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise MartletError("this folder has no config.json: it is not a model folder.", file=path,
                               field="model_id_or_path")
        if info is None:
            info = _infer_info(path)
        return ModelSpec(info.model_type if info else _config_model_type(path), path, info)
    if model_id_or_path:
        if info is None:
            info = _lookup(model_id_or_path)
        if info is not None and info.model_type == EMBEDDED_MODEL_TYPE and model_id_or_path == EMBEDDED_MODEL_TYPE:
            return ModelSpec(info.model_type, embedded_model_dir(), info)
        hub_id = model_id_or_path if "/" in model_id_or_path else None
        if info is not None and os.environ.get("USE_MODELSCOPE_HUB") != "1" and info.hf_id:
            hub_id = info.hf_id  # a ModelScope id or a model type: download the Hugging Face copy
        if hub_id is None:
            raise MartletError(f"'{model_id_or_path}' is neither a local folder, a hub id nor a model type.",
                               field="model_id_or_path")
        path = download(hub_id, revision=revision, token=hub_token, local_only=_is_offline(check_model_is_latest))
        return ModelSpec(info.model_type if info else _config_model_type(path), path, info)
    if info is None:
        info = get_model_info(EMBEDDED_MODEL_TYPE)
    if info.model_type == EMBEDDED_MODEL_TYPE:
        return ModelSpec(info.model_type, embedded_model_dir(), info)
    hub_id = info.ms_id if os.environ.get("USE_MODELSCOPE_HUB") == "1" and info.ms_id else info.hf_id
    if not hub_id:
        raise MartletError(f"model type '{info.model_type}' has no hub id.", field="model_type",
                           hint="Pass a local folder with --model_id_or_path.")
    path = download(hub_id, revision=revision, token=hub_token, local_only=_is_offline(check_model_is_latest))
    return ModelSpec(info.model_type, path, info)


def _lookup(name: str) -> ModelInfo | None:
    info = find_by_hub_id(name)
    if info is not None:
        return info
    try:
        return get_model_info(name)
    except MartletError:
        if "/" in name:
            return None
        raise


def _infer_info(path: str) -> ModelInfo | None:
    """Registry entry of a local folder: a Martlet checkpoint records it; else match the folder name."""
    marker = os.path.join(path, "martlet_converted.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as fh:
            return get_model_info(json.load(fh)["model_type"])
    name = os.path.basename(path.rstrip("/")).lower()
    for candidate in (name, name.replace("_", "-")):
        try:
            return get_model_info(candidate)
        except MartletError:
            pass
    for info in all_models().values():
        for hub in (info.hf_id, info.ms_id):
            if hub and hub.split("/")[-1].lower() == name:
                return info
    return None


def _config_model_type(path: str) -> str:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return str(json.load(fh).get("model_type") or "custom")
    except (OSError, ValueError):
        return "custom"


def needs_remote_code(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return "auto_map" in json.load(fh)
    except (OSError, ValueError):
        return False


def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(spec: ModelSpec, *, dtype: str = "fp32", device_map: Any = None, trust_remote_code: bool = False,
               attn_impl: str | None = None, quantization_config: Any = None, **kwargs: Any):
    """Load the weights (safetensors only) in `dtype`; refuse remote code unless asked for."""
    from transformers import AutoModelForCausalLM

    if needs_remote_code(spec.model_dir) and not trust_remote_code:
        raise MartletError(f"model '{spec.model_type}' ({spec.model_dir}) ships its own Python code.",
                           field="trust_remote_code",
                           hint="Read that code, then pass --trust_remote_code true if you trust it.")
    load_kwargs: dict[str, Any] = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
                                       use_safetensors=True, **kwargs)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if attn_impl:
        load_kwargs["attn_implementation"] = attn_impl
    if quantization_config is not None:
        load_kwargs["quantization_config"] = quantization_config
    try:
        return AutoModelForCausalLM.from_pretrained(spec.model_dir, **load_kwargs)
    except OSError as exc:
        if "safetensors" in str(exc).lower() or "pytorch_model.bin" in str(exc):
            raise MartletError(f"no safetensors weights in {spec.model_dir}: pickle checkpoints are refused.",
                               field="model_id_or_path",
                               hint="Convert the weights to safetensors first.") from None
        raise

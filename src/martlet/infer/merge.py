"""`merge_lora`: add a LoRA checkpoint's weights into its base model and save `<ckpt>-merged/`.

The merged folder is a plain transformers model (safetensors, tokenizer with the chat template used in
training, generation config) plus the checkpoint's sft_args.json and martlet_run.json, so
`--ckpt_dir <ckpt>-merged` works like the adapter did. It is written into a temporary folder and renamed
into place: a killed merge never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

from martlet.args.infer import InferArguments
from martlet.errors import MartletError
from martlet.infer.checkpoint import plan_inference, read_checkpoint, registered
from martlet.models.dtype import torch_dtype
from martlet.models.loader import load_model, load_tokenizer, resolve_model
from martlet.train.outputs import ARGS_FILE, RUN_INFO_FILE
from martlet.tuners import Swift
from martlet.utils import current_umask, follow_umask

logger = logging.getLogger("martlet")
_SAVED_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def merged_dir(ckpt_dir: str) -> str:
    return os.path.abspath(os.path.expanduser(ckpt_dir)).rstrip(os.sep) + "-merged"


def merge_lora(args: InferArguments, replace_if_exists: bool = False, device_map: Optional[str] = None,
               max_shard_size: str = "5GB", **_: Any) -> str:
    """Merge the LoRA checkpoint `args.ckpt_dir` (InferArguments) and return the merged folder.

    A full checkpoint needs no merge: its own folder is returned. An existing `-merged` folder is reused
    unless `replace_if_exists` (or --replace_if_exists).
    """
    if not getattr(args, "ckpt_dir", None):
        raise MartletError("needs the LoRA checkpoint to merge.", field="ckpt_dir")
    ckpt = read_checkpoint(args.ckpt_dir)
    if ckpt.sft_args.get("quantization_bit"):
        logger.warning("this adapter was trained on a %s-bit quantized model: merging it into the full-precision "
                       "weights changes its outputs a little.", ckpt.sft_args["quantization_bit"])
    if not ckpt.is_adapter:
        logger.info("%s holds full weights: nothing to merge.", ckpt.path)
        return ckpt.path
    target = merged_dir(ckpt.path)
    if os.path.isdir(target) and not (replace_if_exists or getattr(args, "replace_if_exists", False)):
        logger.info("%s has a merged model already: using it (pass --replace_if_exists true to merge again).",
                    ckpt.path)
        return target
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=os.path.dirname(target))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the merged model is an ordinary folder
    try:
        spec = _write_merged(args, ckpt, tmp, device_map or getattr(args, "merge_device_map", "cpu"), max_shard_size)
        for name in (ARGS_FILE, RUN_INFO_FILE):
            if os.path.isfile(os.path.join(ckpt.path, name)):
                shutil.copy2(os.path.join(ckpt.path, name), os.path.join(tmp, name))
        if registered(spec.model_type):  # lets `--model_id_or_path <merged>` alone find the model type
            with open(os.path.join(tmp, "martlet_converted.json"), "w", encoding="utf-8") as fh:
                json.dump({"source": ckpt.path, "base_model": spec.model_dir, "model_type": spec.model_type}, fh)
        follow_umask(tmp)  # safetensors writes its files 0600
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("merged %s into its base model.", ckpt.path)  # where to: the caller says (it has the path)
    return target


def _write_merged(args: InferArguments, ckpt: Any, out_dir: str, device_map: str, max_shard_size: str = "5GB"):
    """Load the base in fp32, add the adapter in, save in the base's own dtype (or --dtype) to `out_dir`."""
    plan = plan_inference(args)
    spec = resolve_model(plan.model_type, plan.model_id_or_path, check_model_is_latest=args.check_model_is_latest,
                         revision=args.model_revision, hub_token=args.hub_token)
    save_dtype = args.dtype if args.dtype not in ("AUTO", None) else _saved_dtype(spec.model_dir)
    model = load_model(spec, dtype="fp32", device_map=None if device_map == "cpu" else device_map,
                       trust_remote_code=args.trust_remote_code)
    model = Swift.from_pretrained(model, ckpt.path, inference_mode=True).merge_and_unload()
    model = model.to(torch_dtype(save_dtype))
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer = load_tokenizer(plan.tokenizer_dir or spec.model_dir, trust_remote_code=args.trust_remote_code)
    tokenizer.save_pretrained(out_dir)
    return spec


def _saved_dtype(model_dir: str) -> str:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return "fp32"
    return _SAVED_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), "fp32")


def _move_into_place(tmp: str, target: str) -> None:
    old = None
    if os.path.isdir(target):  # replacing: move the old one aside first (rename needs an empty target)
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-old-", dir=os.path.dirname(target))
        os.replace(target, os.path.join(old, "merged"))
    os.replace(tmp, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)

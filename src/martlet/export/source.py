"""What `martlet export` works on: a checkpoint (merged first when it is a LoRA adapter) or a model.

Merging uses `martlet.infer.merge.merge_lora`, the same merge as `martlet infer --merge_lora true`. It is
refused onto a quantized base (bitsandbytes for QLoRA, or a GPTQ/AWQ model): adding the adapter to
4/8-bit weights, or to weights dequantized from them, loses precision, as the spec says.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

from martlet.args.export import ExportArguments
from martlet.args.infer import InferArguments
from martlet.errors import MartletError
from martlet.infer.checkpoint import plan_inference, read_checkpoint, registered
from martlet.infer.merge import merge_lora
from martlet.models.loader import resolve_model
from martlet.utils import follow_umask

logger = logging.getLogger("martlet")


@dataclasses.dataclass(frozen=True)
class Source:
    path: str  # a folder of full weights, or the adapter folder when nothing needs merging
    is_adapter: bool
    checkpoint: Any  # martlet.infer.checkpoint.Checkpoint, or None for a model
    model_type: Optional[str]  # the model type (registered, or the config's model_type), when known


def infer_arguments(args: ExportArguments):
    """The InferArguments that describe the same checkpoint and model (what merge_lora reads)."""
    same = ("ckpt_dir", "model_type", "model_id_or_path", "model_revision", "dtype", "check_model_is_latest",
            "trust_remote_code", "hub_token", "template_type", "system", "merge_device_map", "replace_if_exists")
    return InferArguments(**{name: getattr(args, name) for name in same})


def quantization_of(model_dir: str) -> Optional[str]:
    """'gptq', 'awq', 'bitsandbytes', ... when the weights in `model_dir` are quantized, else None."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config")
    if not quant:
        return None
    return str(quant.get("quant_method") or ("bitsandbytes" if quant.get("load_in_4bit") or quant.get("load_in_8bit")
                                             else "quantized"))


def refuse_quantized_merge(ckpt: Any, base_dir: Optional[str]) -> None:
    """MartletError when the adapter sits on 4/8-bit weights (spec: merging those loses precision)."""
    bits = ckpt.sft_args.get("quantization_bit")
    if bits:
        raise MartletError(f"this LoRA adapter was trained on a {bits}-bit bitsandbytes model (QLoRA): merging it "
                           "is refused, since adding it to quantized or dequantized weights loses precision.",
                           file=ckpt.path, field="merge_lora",
                           hint="Use the adapter as it is (`martlet infer --ckpt_dir ...`), or train LoRA without "
                                "--quantization_bit to export a merged model.")
    method = quantization_of(base_dir) if base_dir else None
    if method:
        raise MartletError(f"the base model is {method}-quantized ({base_dir}): merging LoRA into it is refused, "
                           "since it loses precision.", file=ckpt.path, field="merge_lora",
                           hint="Train the adapter on the full-precision model to export a merged model, or use "
                                "the adapter as it is.")


def _base_dir(args: ExportArguments) -> Optional[str]:
    plan = plan_inference(infer_arguments(args))
    spec = resolve_model(plan.model_type, plan.model_id_or_path, check_model_is_latest=args.check_model_is_latest,
                         revision=args.model_revision, hub_token=args.hub_token)
    return spec.model_dir


def merge_checkpoint(args: ExportArguments) -> str:
    """Merge the LoRA checkpoint `args.ckpt_dir` into its base model; returns the `-merged` folder."""
    ckpt = read_checkpoint(args.ckpt_dir)
    refuse_quantized_merge(ckpt, _base_dir(args) if ckpt.is_adapter else None)
    merged = merge_lora(infer_arguments(args), replace_if_exists=args.replace_if_exists,
                        device_map=args.merge_device_map, max_shard_size=args.max_shard_size)
    follow_umask(merged)  # safetensors writes its files 0600
    return merged


def resolve_source(args: ExportArguments, needs_weights: bool) -> Source:
    """The folder to export: the merged model when asked or needed, else the checkpoint or model as it is."""
    if args.ckpt_dir:
        ckpt = read_checkpoint(args.ckpt_dir)
        model_type = registered(ckpt.run.get("model_type")) or registered(ckpt.sft_args.get("model_type"))
        if ckpt.is_adapter and (args.merge_lora or needs_weights):
            if not args.merge_lora:
                logger.info("%s is a LoRA adapter: merging it first.", ckpt.path)
            return Source(merge_checkpoint(args), False, ckpt, model_type)
        if args.merge_lora and not ckpt.is_adapter:
            logger.info("%s holds full weights: nothing to merge.", ckpt.path)
        return Source(ckpt.path, ckpt.is_adapter, ckpt, model_type)

    spec = resolve_model(args.model_type, args.model_id_or_path, check_model_is_latest=args.check_model_is_latest,
                         revision=args.model_revision, hub_token=args.hub_token)
    return Source(spec.model_dir, False, None, spec.model_type)

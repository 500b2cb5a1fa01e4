"""What `--ckpt_dir` holds, and the model, template and system prompt that inference uses.

A checkpoint of `martlet sft` carries `sft_args.json` (every training argument) and `martlet_run.json`
(model type and folder, template, system prompt), plus the tokenizer with the chat template used in
training, and a LoRA adapter or full weights; a checkpoint of `martlet rlhf` (dpo, orpo, ...) has the same
files, its arguments naming the rlhf_type. `plan_inference` combines them with the arguments given
now: a value the user set explicitly wins over the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from martlet.args.infer import InferArguments
from martlet.errors import MartletError
from martlet.models.registry import get_model_info
from martlet.train.outputs import ARGS_FILE, RUN_INFO_FILE

ADAPTER_CONFIG = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: str
    is_adapter: bool  # a LoRA adapter (else full weights: a full or merged checkpoint)
    sft_args: dict  # {} when the folder has no sft_args.json
    run: dict  # {} when the folder has no martlet_run.json

    @property
    def has_tokenizer(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "tokenizer_config.json"))

    def adapter_base(self) -> Optional[str]:
        if not self.is_adapter:
            return None
        return _read_json(os.path.join(self.path, ADAPTER_CONFIG)).get("base_model_name_or_path")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise MartletError(f"cannot read: {exc}", file=path, field="ckpt_dir") from None
    return data if isinstance(data, dict) else {}


def read_checkpoint(path: str) -> Checkpoint:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise MartletError("checkpoint folder not found.", file=path, field="ckpt_dir")
    is_adapter = os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
    if not is_adapter and not os.path.isfile(os.path.join(path, "config.json")):
        raise MartletError("this folder holds neither a LoRA adapter (adapter_config.json) nor model weights "
                           "(config.json).", file=path, field="ckpt_dir",
                           hint="Pass a checkpoint-N folder of `martlet sft`, or its -merged folder.")
    return Checkpoint(path, is_adapter, _read_json(os.path.join(path, ARGS_FILE)),
                      _read_json(os.path.join(path, RUN_INFO_FILE)))


@dataclasses.dataclass(frozen=True)
class InferPlan:
    """Everything needed to load the engine, after the checkpoint and the arguments are combined."""

    model_type: Optional[str]  # a registered model type, or None (inferred from the folder)
    model_id_or_path: Optional[str]  # the weights to load: a base model, or a full/merged checkpoint
    adapter_dir: Optional[str]  # a LoRA adapter to put on top
    tokenizer_dir: Optional[str]  # None: the model's own folder
    template_type: str
    system: Optional[str]
    checkpoint: Optional[Checkpoint]


def registered(model_type: Optional[str]) -> Optional[str]:
    """`model_type` when the registry knows it (a checkpoint of an unregistered folder records e.g. 'llama')."""
    if not model_type:
        return None
    try:
        return get_model_info(model_type).model_type
    except MartletError:
        return None


def plan_inference(args: InferArguments) -> InferPlan:
    """The plan for InferArguments `args`; with --ckpt_dir, explicit arguments win over the checkpoint."""
    if not args.ckpt_dir:
        return InferPlan(args.model_type, args.model_id_or_path, None, None, args.template_type, args.system, None)
    ckpt = read_checkpoint(args.ckpt_dir)
    run, saved = ckpt.run, ckpt.sft_args
    model_type = args.model_type or registered(run.get("model_type")) or registered(saved.get("model_type"))
    if ckpt.is_adapter:
        weights = args.model_id_or_path or _base_model(ckpt)
        if weights is None and model_type is None:
            raise MartletError("cannot tell which base model this adapter belongs to.", file=ckpt.path,
                               field="model_id_or_path", hint="Pass the base model with --model_id_or_path.")
    else:
        weights = ckpt.path
    template_type = args.template_type
    if template_type == "AUTO" and run.get("template_type") not in (None, "tokenizer", "AUTO"):
        template_type = run["template_type"]  # the named template training used
    system = args.system if args.system is not None else run.get("system")
    return InferPlan(model_type, weights, ckpt.path if ckpt.is_adapter else None,
                     ckpt.path if ckpt.has_tokenizer else None, template_type, system, ckpt)


def _base_model(ckpt: Checkpoint) -> Optional[str]:
    """Where the training run's base weights are: its model folder if it still exists, else its hub id."""
    for candidate in (ckpt.run.get("model_dir"), ckpt.adapter_base()):
        if candidate and os.path.isdir(candidate):
            return candidate
    return ckpt.sft_args.get("model_id_or_path")  # a hub id, or None: the model type says

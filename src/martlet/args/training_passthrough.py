"""Fields of transformers' TrainingArguments that Martlet does not own, passed through to transformers
(`--optim adafactor`, `--adam_beta2 0.95`, `--lr_scheduler_kwargs '{"min_lr": 1e-6}'`).

They are gathered into the training commands' `training_args` field (so sft_args.json keeps them), typed as
TrainingArguments types them, and checked by transformers itself: a TrainingArguments is built with them and
the optimizer and learning-rate schedule they ask for are made on a one-weight model, so what transformers or
torch would refuse at the first step is refused at once, naming the field. transformers is imported only when
a key is not Martlet's own.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Collection, get_args, get_origin

from martlet.args.base import convert
from martlet.errors import MartletError, did_you_mean

# TrainingArguments fields that Martlet sets from its own arguments or needs as it sets them
SET_BY_MARTLET = {
    "bf16": "Martlet sets it from --dtype",
    "fp16": "Martlet sets it from --dtype",
    "use_cpu": "Martlet sets it from the device it trains on (CUDA_VISIBLE_DEVICES='' trains on the CPU)",
    "remove_unused_columns": "Martlet's data collators need it false",
    "prediction_loss_only": "Martlet evaluates the loss only",
    "activation_checkpointing": "Martlet sets it from --gradient_checkpointing",
    "activation_checkpointing_kwargs": "Martlet sets it from --gradient_checkpointing",
    "gradient_checkpointing_kwargs": "Martlet sets it from --gradient_checkpointing",
    "train_sampling_strategy": "Martlet sets it from --group_by_length",
    "local_rank": "the launcher sets it (NPROC_PER_NODE, torchrun)",
}
# optimizers whose class torch or transformers provide without another package, made on a one-weight model
_BUILT_IN_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")


def _kind(hint: Any) -> Any:
    """bool, int, float, dict, list or str: what a TrainingArguments field's type hint asks a value to be."""
    parts = get_args(hint) if get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    parts = tuple(p for p in parts if p is not type(None))
    if any(p is dict or get_origin(p) is dict for p in parts):
        return dict
    if any(p is list or get_origin(p) is list for p in parts):
        return list
    if len(parts) == 1 and parts[0] in (bool, int, float):
        return parts[0]
    return bool if parts == (str, bool) else str


@functools.lru_cache(maxsize=1)
def training_fields() -> dict[str, Any]:
    """Every TrainingArguments field a user may set, with its kind (see `_kind`)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(TrainingArguments) if f.init}


def _typed(key: str, raw: Any, where: str) -> Any:
    kind = training_fields()[key]
    items = raw if isinstance(raw, list) else [raw]
    if kind is list:
        return [convert(v, str, key, where) for v in items]
    if len(items) != 1:
        raise MartletError(f"expects one value, got {len(items)}: {items}", field=key)
    if kind is bool and str(items[0]).lower() not in ("true", "false", "1", "0", "yes", "no", "none", "null"):
        return convert(items[0], str, key, where)  # a field that takes true/false or a name
    return convert(items[0], kind, key, where)


class TrainingArgumentsKeys:
    """The ExtraKeys of the `training_args` field: TrainingArguments' fields that Martlet leaves to the user."""

    def names(self) -> Collection[str]:
        return list(training_fields())  # those Martlet sets are refused by `convert`, saying why

    def convert(self, values: dict[str, Any], where: str) -> dict[str, Any]:
        file = None if where == "command line" else where
        out = {}
        for key, raw in values.items():
            if key in SET_BY_MARTLET:
                raise MartletError(f"is not passed through to transformers: {SET_BY_MARTLET[key]}.", file=file,
                                   field=key)
            if key not in training_fields():
                raise MartletError(f"unknown TrainingArguments field '{key}'."
                                   f"{did_you_mean(key, training_fields())}", file=file, field="training_args")
            out[key] = _typed(key, raw, where)
        return out


TRAINING_ARGS_KEYS = TrainingArgumentsKeys()


def _refusal(values: dict[str, Any], base: dict[str, Any]) -> str | None:
    """Why transformers (or torch) refuses these TrainingArguments values on top of `base`; None if it accepts
    them."""
    import torch
    from transformers import Trainer, TrainingArguments, get_scheduler

    try:
        training_args = TrainingArguments(**{**base, **values, "use_cpu": True, "report_to": "none"})
        if str(getattr(training_args.optim, "value", training_args.optim)) not in _BUILT_IN_OPTIMIZERS:
            return None  # another package's optimizer: transformers checks it when training starts
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
        optimizer = optimizer_cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
        get_scheduler(training_args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10,
                      scheduler_specific_kwargs=training_args.lr_scheduler_kwargs)
    except (ValueError, TypeError, ImportError, KeyError) as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def check_training_args(values: dict[str, Any], own: Collection[str], base: dict[str, Any]) -> None:
    """MartletError naming the field when a pass-through value is Martlet's own argument, set by Martlet, or
    refused by transformers (or torch) on top of Martlet's `base` keywords. Changes nothing."""
    if not values:
        return
    for key in values:
        if key in own:
            raise MartletError(f"is Martlet's own argument: give it as --{key}, not in training_args.", field=key)
    TRAINING_ARGS_KEYS.convert(values, "command line")  # names and Martlet's own fields
    problem = _refusal(values, base)
    if problem is None:
        return
    culprits = [key for key in values if _refusal({key: values[key]}, base) is not None] or list(values)
    given = ", ".join(f"{key}={values[key]!r}" for key in culprits)
    raise MartletError(f"refused by transformers/torch ({given}): {problem}", field=", ".join(culprits))

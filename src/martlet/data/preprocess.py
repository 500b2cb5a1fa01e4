"""Rows -> token ids and labels, with a reproducible validation split and length statistics."""

from __future__ import annotations

import logging
import random
from typing import Any, Sequence

from martlet.data.sources import load_dataset_rows
from martlet.errors import MartletError
from martlet.templates.template import IGNORE_INDEX, Template

logger = logging.getLogger("martlet")


def load_rows(specs: Sequence[str], *, seed: int, model_name: Sequence[str] = (),
              model_author: Sequence[str] = ()) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for spec in specs:
        rows += load_dataset_rows(spec, seed=seed, model_name=model_name, model_author=model_author)
    return rows


def split_train_val(rows: list[dict[str, Any]], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out round(len * ratio) rows (at least one when ratio > 0), chosen by `seed`."""
    if ratio <= 0 or len(rows) < 2:
        return rows, []
    n_val = min(len(rows) - 1, max(1, round(len(rows) * ratio)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_index = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in val_index]
    val = [rows[i] for i in sorted(val_index)]
    return train, val


def train_val_rows(args: Any) -> tuple[list[dict], list[dict]]:
    """The training and validation rows that the arguments describe (the same for the same seed)."""
    if getattr(args, "custom_dataset_info", None):
        from martlet.data.sources import register_dataset_info

        register_dataset_info(args.custom_dataset_info)
    names = dict(model_name=args.model_name, model_author=args.model_author)
    rows = load_rows(args.dataset, seed=args.dataset_seed, **names)
    if args.val_dataset:
        train, val = rows, load_rows(args.val_dataset, seed=args.dataset_seed, **names)
    else:
        train, val = split_train_val(rows, args.dataset_test_ratio, args.dataset_seed)
    if args.train_dataset_sample >= 0:
        train = train[: args.train_dataset_sample] if args.train_dataset_sample < len(train) else train
    if args.val_dataset_sample is not None:
        val = val[: args.val_dataset_sample]
    return train, val


def _encode(row: dict[str, Any], template: Template, mode: str) -> dict[str, Any]:
    try:
        if row.get("text") is not None:
            enc = template.encode_text(row["text"])
        elif mode == "pt":
            enc = template.encode_text(template.render(template.with_system(row["messages"])))
        else:
            enc = template.encode(row["messages"])
    except MartletError as exc:
        return {"input_ids": [], "labels": [], "length": 0, "error": f"{row.get('where')}: {exc}"}
    if enc is None:
        return {"input_ids": [], "labels": [], "length": 0, "error": None}
    return {"input_ids": enc.input_ids, "labels": enc.labels, "length": len(enc.input_ids), "error": None}


def encode_rows(rows: list[dict[str, Any]], template: Template, *, mode: str = "sft", num_proc: int = 1,
                what: str = "train"):
    """A `datasets.Dataset` of input_ids/labels; logs length statistics and how many rows were dropped."""
    import datasets

    if mode == "sft" and any(row.get("text") is not None for row in rows):
        bad = next(row for row in rows if row.get("text") is not None)
        raise MartletError("plain-text rows are for `martlet pt`; `martlet sft` needs conversations.",
                           file=str(bad.get("where")), field="text")
    table = datasets.Dataset.from_list(rows)
    encoded = table.map(_encode, fn_kwargs={"template": template, "mode": mode},
                        remove_columns=table.column_names, num_proc=num_proc if num_proc > 1 else None,
                        desc=f"Tokenizing {what}")
    errors = [e for e in encoded["error"] if e]
    if errors:
        more = f" (and {len(errors) - 1} more rows)" if len(errors) > 1 else ""
        raise MartletError(f"{errors[0]}{more}")
    kept = encoded.filter(lambda n: n > 0, input_columns="length").remove_columns(["error"])
    stats = length_stats(kept["length"])
    stats.update(rows=len(rows), kept=len(kept), dropped=len(rows) - len(kept))
    if len(rows) and stats["dropped"]:
        logger.warning("%s: %d of %d rows are longer than max_length=%s and were dropped "
                       "(use --truncation_strategy truncation_left to keep them).",
                       what, stats["dropped"], len(rows), template.max_length)
    logger.info("%s: %s", what, ", ".join(f"{k}={v}" for k, v in stats.items()))
    if len(kept) == 0:
        raise MartletError(f"no {what} rows left: all {len(rows)} are longer than max_length={template.max_length}.",
                           field="max_length", hint="Raise --max_length or use --truncation_strategy truncation_left.")
    return kept, stats


def length_stats(lengths: Sequence[int]) -> dict[str, Any]:
    if not lengths:
        return {"tokens": 0}
    ordered = sorted(lengths)
    return {"tokens": sum(ordered), "mean_len": round(sum(ordered) / len(ordered), 1), "min_len": ordered[0],
            "p50_len": ordered[len(ordered) // 2], "p95_len": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "max_len": ordered[-1]}


def label_tokens(labels: Sequence[int]) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]

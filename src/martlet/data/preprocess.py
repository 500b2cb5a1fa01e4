"""Rows -> token ids and labels, with a reproducible validation split and length statistics.

`conversation_rows` reads one --dataset entry as conversations (a preference set gives its chosen replies);
`train_val_rows` splits what the arguments name; `encode_rows` tokenizes, through the cache of `data.cache`.
Custom registrations (--custom_register_path, --custom_dataset_info) are applied once, at the start of the
command, before anything here runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from martlet.args.data import DataArguments
from martlet.args.sft import PtArguments, SftArguments
from martlet.data.cache import cached_encoding, length_stats
from martlet.data.formats import RowError, check_replies
from martlet.data.preference import chosen_conversations, is_preference_set
from martlet.data.sources import load_dataset_rows, split_train_val
from martlet.errors import DatasetErrors, MartletError
from martlet.templates.template import Template

__all__ = ["conversation_rows", "load_rows", "split_train_val", "train_val_rows", "encode_rows",
           "check_conversations"]
logger = logging.getLogger("martlet")


def conversation_rows(spec: str, *, seed: int = 42, model_name: Sequence[str] = (), model_author: Sequence[str] = (),
                      needs_reply: bool = False) -> list[dict[str, Any]]:
    """Canonical conversation rows of one --dataset entry (see `sources.load_dataset_rows`); a built-in
    preference set gives each pair's prompt and chosen reply (SFT on it learns the chosen replies)."""
    if is_preference_set(spec):
        return chosen_conversations(spec, seed=seed, model_name=model_name, model_author=model_author)
    return load_dataset_rows(spec, seed=seed, model_name=model_name, model_author=model_author,
                             needs_reply=needs_reply)


def load_rows(specs: Sequence[str], *, seed: int, model_name: Sequence[str] = (), model_author: Sequence[str] = (),
              needs_reply: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for spec in specs:
        rows += conversation_rows(spec, seed=seed, model_name=model_name, model_author=model_author,
                                  needs_reply=needs_reply)
    return rows


def train_val_rows(args: DataArguments) -> tuple[list[dict], list[dict]]:
    """The training and validation rows that the arguments describe (the same for the same seed).

    For `martlet sft` (SftArguments) every conversation must end with the assistant's reply; `martlet pt`
    renders whole conversations and `martlet infer` generates the reply, so their rows may end with a user turn.
    """
    needs_reply = isinstance(args, SftArguments) and not isinstance(args, PtArguments)
    names = dict(model_name=args.model_name, model_author=args.model_author, needs_reply=needs_reply)
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


def encode_rows(rows: list[dict[str, Any]], template: Template, *, mode: str = "sft", num_proc: int | None = 1,
                what: str = "train", cache: bool = True):
    """A `datasets.Dataset` of input_ids/labels/length; logs length statistics and how many rows were dropped.

    The result is cached in Martlet's cache under a hash of the rows and of everything that shapes their
    tokens (tokenizer, chat template, system, max length, truncation), so a second run on the same data
    starts at once. A set with bad rows is never cached.
    """
    import datasets

    if mode == "sft" and any(row.get("text") is not None for row in rows):
        bad = next(row for row in rows if row.get("text") is not None)
        raise MartletError("plain-text rows are for `martlet pt`; `martlet sft` needs conversations.",
                           file=str(bad.get("where")), field="text")
    check_conversations(rows, needs_reply=mode == "sft")

    def build():
        procs = num_proc if num_proc is not None else max(1, min(os.cpu_count() or 1, len(rows) // 10_000))
        table = datasets.Dataset.from_list(rows)
        encoded = table.map(_encode, fn_kwargs={"template": template, "mode": mode},
                            remove_columns=table.column_names, num_proc=procs if procs > 1 else None,
                            desc=f"Tokenizing {what}")
        errors = [MartletError(e) for e in encoded["error"] if e]
        if errors:
            raise DatasetErrors(errors)
        kept = encoded.filter(lambda n: n > 0, input_columns="length").remove_columns(["error"])
        stats = length_stats(kept["length"])
        stats.update(rows=len(rows), kept=len(kept), dropped=len(rows) - len(kept))
        return kept, stats

    return cached_encoding(rows, template, [mode], build, lambda stats: _report(stats, what, template),
                           what=what, cache=cache, code=[__file__])


def check_conversations(rows: Sequence[dict[str, Any]], *, needs_reply: bool) -> None:
    """DatasetErrors naming every row (by its `where`) with an empty assistant reply or, with `needs_reply`,
    without the assistant's reply last: rows given in Python get the checks that file rows get when read."""
    errors = []
    for row in rows:
        try:
            if row.get("messages") is not None:
                check_replies(row["messages"], "messages", needs_reply=needs_reply)
        except RowError as exc:
            errors.append(MartletError(exc.message, file=str(row.get("where")), field=exc.field, hint=exc.hint))
    if errors:
        raise DatasetErrors(errors)


def _report(stats: dict[str, Any], what: str, template: Template) -> None:
    if stats["rows"] and stats["dropped"]:
        logger.warning("%s: %d of %d rows are longer than max_length=%s and were dropped "
                       "(use --truncation_strategy truncation_left to keep them).",
                       what, stats["dropped"], stats["rows"], template.max_length)
    logger.info("%s: %s", what, ", ".join(f"{k}={v}" for k, v in stats.items()))
    if stats["kept"] == 0:
        raise MartletError(f"no {what} rows left: all {stats['rows']} are longer than max_length="
                           f"{template.max_length}.", field="max_length",
                           hint="Raise --max_length or use --truncation_strategy truncation_left.")

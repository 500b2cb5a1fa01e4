"""Rows -> token ids and labels, with a reproducible validation split and length statistics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from typing import Any, Callable, Sequence

from martlet.args.sft import PtArguments, SftArguments
from martlet.data.formats import RowError, check_replies
from martlet.data.sources import load_dataset_rows
from martlet.errors import DatasetErrors, MartletError
from martlet.models.embedded import cache_dir
from martlet.templates.template import IGNORE_INDEX, Template

logger = logging.getLogger("martlet")


def load_rows(specs: Sequence[str], *, seed: int, model_name: Sequence[str] = (), model_author: Sequence[str] = (),
              needs_reply: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for spec in specs:
        rows += load_dataset_rows(spec, seed=seed, model_name=model_name, model_author=model_author,
                                  needs_reply=needs_reply)
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
    """The training and validation rows that the arguments describe (the same for the same seed).

    For `martlet sft` (SftArguments) every conversation must end with the assistant's reply; `martlet pt`
    renders whole conversations and `martlet infer` generates the reply, so their rows may end with a user turn.
    """
    from martlet.custom import apply_custom_registrations

    apply_custom_registrations(args)
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
                           what=what, cache=cache)


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


def cached_encoding(rows: list[dict[str, Any]], template: Template, key: list[Any], build: Callable[[], tuple],
                    report: Callable[[dict], None], *, what: str, cache: bool = True, code: Sequence[str] = ()):
    """`build()` -> (dataset, stats), kept in Martlet's cache under a hash of the rows, the template, `key` and
    the encoding code (this module, the template module and the files in `code`). `report(stats)` logs the
    statistics (and raises when nothing is left) before anything is written. Under torchrun, call it inside
    `main_process_first()`: rank 0 encodes and writes, the other ranks read."""
    import datasets

    folder = os.path.join(cache_dir(), "tokenized", _fingerprint(rows, template, key, code)) if cache else None
    if folder and os.path.isfile(os.path.join(folder, "stats.json")):
        with open(os.path.join(folder, "stats.json"), encoding="utf-8") as fh:
            stats = json.load(fh)
        logger.info("%s: tokenized rows from the cache (%s)", what, folder)
        report(stats)
        return datasets.load_from_disk(os.path.join(folder, "data")), stats
    dataset, stats = build()
    report(stats)
    if folder:
        _save(dataset, stats, folder)
    return dataset, stats


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


CACHE_FORMAT = 1  # bump when encoding changes what it produces for the same inputs


def _code_hash(code: Sequence[str] = ()) -> str:
    """The encoding code itself is part of the key, so an edited template module never reads stale rows."""
    from martlet.templates import template as template_module

    h = hashlib.sha256()
    for path in (__file__, template_module.__file__, *code):
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _fingerprint(rows: list[dict[str, Any]], template: Template, key: list[Any], code: Sequence[str] = ()) -> str:
    import martlet

    tok = template.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, martlet.__version__, _code_hash(code), key, template.template_type,
                                   template.chat_template, template.eot, template.system, template.max_length,
                                   template.truncation_strategy, type(tok).__name__, len(tok)]).encode())
    h.update(backend.to_str().encode() if backend is not None else str(sorted(tok.get_vocab().items())).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:32]


def _save(dataset: Any, stats: dict[str, Any], folder: str) -> None:
    """Written beside the target and renamed into place, so a killed run never leaves half a cache entry."""
    import shutil
    import tempfile

    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(folder))
    try:
        dataset.save_to_disk(os.path.join(tmp, "data"))
        with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as fh:
            json.dump(stats, fh)
        os.replace(tmp, folder)
    except OSError as exc:  # a full or read-only cache only costs the next run some time
        if not os.path.isfile(os.path.join(folder, "stats.json")):  # (else another process cached them first)
            logger.warning("could not cache the tokenized rows in %s: %s", folder, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def length_stats(lengths: Sequence[int]) -> dict[str, Any]:
    if not lengths:
        return {"tokens": 0}
    ordered = sorted(lengths)
    return {"tokens": sum(ordered), "mean_len": round(sum(ordered) / len(ordered), 1), "min_len": ordered[0],
            "p50_len": ordered[len(ordered) // 2], "p95_len": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "max_len": ordered[-1]}


def label_tokens(labels: Sequence[int]) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]

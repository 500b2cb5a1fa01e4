"""Martlet's cache of tokenized rows, shared by SFT and preference encoding.

An entry is keyed by a hash of the rows, of everything that shapes their tokens (tokenizer, chat template,
system, max length, truncation) and of the encoding code itself, so an edited encoder never reads stale rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import martlet
from martlet.models.embedded import cache_dir
from martlet.templates import template as template_module
from martlet.templates.template import Template

logger = logging.getLogger("martlet")
CACHE_FORMAT = 1  # bump when encoding changes what it produces for the same inputs


def cached_encoding(rows: list[dict[str, Any]], template: Template, key: list[Any], build: Callable[[], tuple],
                    report: Callable[[dict], None], *, what: str, cache: bool = True, code: Sequence[str] = ()):
    """`build()` -> (dataset, stats), kept in Martlet's cache under a hash of the rows, the template, `key` and
    the encoding code (this module, the template module and the files in `code`: the caller's encoder).
    `report(stats)` logs the statistics (and raises when nothing is left) before anything is written. Under
    torchrun, call it inside `main_process_first()`: rank 0 encodes and writes, the other ranks read."""
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
        save_entry(dataset, stats, folder)
    return dataset, stats


def _code_hash(code: Sequence[str] = ()) -> str:
    """The encoding code itself is part of the key, so an edited template module never reads stale rows."""
    h = hashlib.sha256()
    for path in (__file__, template_module.__file__, *code):
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _fingerprint(rows: list[dict[str, Any]], template: Template, key: list[Any], code: Sequence[str] = ()) -> str:
    tok = template.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, martlet.__version__, _code_hash(code), key, template.template_type,
                                   template.chat_template, template.eot, template.system, template.max_length,
                                   template.truncation_strategy, type(tok).__name__, len(tok)]).encode())
    h.update(backend.to_str().encode() if backend is not None else str(sorted(tok.get_vocab().items())).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:32]


def save_entry(dataset: Any, stats: dict[str, Any], folder: str) -> None:
    """Written beside the target and renamed into place, so a killed run never leaves half a cache entry."""
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

"""Preference data: row formats -> (prompt, chosen, rejected) or (prompt, completion, label) -> token ids.

Accepted rows (detected per row; `system` and `history` work as in SFT data):
- prompt/chosen/rejected: `prompt` (or `query`/`instruction`) a string or a list of messages; chosen and
  rejected strings, {role, content} / {from, value} objects, or lists of messages (trl style: with no prompt,
  their shared leading messages are the prompt);
- a conversation (messages, sharegpt conversations, query/response, alpaca) whose last assistant turn is the
  chosen reply, plus `rejected_response`;
- for KTO: a conversation (or prompt/completion) plus `label` (true: desirable). Pairs also work for KTO: each
  gives a desirable and an undesirable row.

Every reply must say something (an empty or blank one is refused wherever it appears), and the prompt ends with
a user turn.

The prompt is rendered with the same Template as SFT; only the final reply's tokens (up to its end-of-turn
marker) count.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from typing import Any, Sequence

from martlet.args.rlhf import RLHFArguments
from martlet.data.builtin import pref_identity, pref_math
from martlet.data.cache import cached_encoding, length_stats
from martlet.data.formats import RowError, to_canonical
from martlet.data.sources import (READERS, dataset_registry, find_registered, looks_like_hub_id, parse_spec,
                                  sample_rows, split_train_val)
from martlet.errors import DatasetErrors, MartletError, did_you_mean
from martlet.templates.template import IGNORE_INDEX, Template

logger = logging.getLogger("martlet")
_PREF_KEYS = ("chosen", "rejected", "rejected_response", "label", "completion")
_TRUE, _FALSE = {"true", "1", "yes", "desirable"}, {"false", "0", "no", "undesirable"}


# row formats ----------------------------------------------------------------------------------------------
def _reply(value: Any, field: str) -> tuple[list[dict[str, str]], str]:
    """(messages before it, text) of a reply given as a string, one message, or a list of messages."""
    if isinstance(value, str):
        return [], value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError("must be a string, a message or a list of messages.", field=field)
    messages = to_canonical({"conversations": value} if "from" in value[0] else {"messages": value})["messages"]
    if messages[-1]["role"] != "assistant":
        raise RowError("must end with an assistant message.", field=field)
    return messages[:-1], messages[-1]["content"]


def _prompt(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The conversation before the reply (system and history included), or None when the row gives none."""
    base = {k: v for k, v in row.items() if k not in _PREF_KEYS}
    if "prompt" in base:
        prompt = base.pop("prompt")
        base["messages" if isinstance(prompt, list) else "query"] = prompt
    if not any(k in base for k in ("messages", "conversations", "query", "instruction")):
        return None
    reply_key = "output" if "instruction" in base else "response"
    if "query" in base or "instruction" in base:
        base[reply_key] = "-"  # a stand-in reply, so formats.py builds the conversation and drops it again
    messages = to_canonical(base)["messages"]
    if reply_key in base:
        messages = messages[:-1]
    if messages[-1]["role"] != "user":
        raise RowError("the prompt must end with a user turn.", field="prompt")
    return messages


def _split_last_reply(row: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    messages = to_canonical({k: v for k, v in row.items() if k not in _PREF_KEYS})["messages"]
    if messages[-1]["role"] != "assistant":
        raise RowError("the conversation must end with the assistant reply (the chosen one).", field="messages")
    return messages[:-1], messages[-1]["content"]


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise RowError(f"must be true or false, got {value!r}.", field="label")


def to_pair(row: dict[str, Any]) -> dict[str, Any]:
    """{"prompt": messages ending with a user turn, "chosen": text, "rejected": text} of one row."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}.")
    if "rejected_response" in row:
        prompt, chosen = _split_last_reply(row)
        return {"prompt": prompt, "chosen": chosen, "rejected": _text(row["rejected_response"], "rejected_response")}
    if "chosen" not in row or "rejected" not in row:
        hint = " Rows with `label` are for KTO (--rlhf_type kto)." if "label" in row else ""
        raise RowError("a preference row needs chosen and rejected replies (or a conversation plus "
                       f"rejected_response).{hint}", field="chosen" if "chosen" not in row else "rejected")
    lead, chosen = _reply(row["chosen"], "chosen")
    lead_r, rejected = _reply(row["rejected"], "rejected")
    if lead != lead_r:
        raise RowError("chosen and rejected must share the conversation before their last reply.", field="rejected")
    prompt = (_prompt(row) or []) + lead
    if not prompt:
        raise RowError("no prompt: give `prompt` (or query/messages), or chosen/rejected conversations.",
                       field="prompt")
    return {"prompt": prompt, "chosen": _text(chosen, "chosen"), "rejected": _text(rejected, "rejected")}


def to_unpaired(row: dict[str, Any]) -> list[dict[str, Any]]:
    """KTO rows {"prompt", "completion", "label"}: one from a `label` row, two from a pair."""
    if isinstance(row, dict) and "label" not in row:
        pair = to_pair(row)
        return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}.")
    if "completion" in row:
        prompt = _prompt(row)
        lead, completion = _reply(row["completion"], "completion")
        prompt = (prompt or []) + lead
        if not prompt:
            raise RowError("no prompt: give `prompt` (or query/messages).", field="prompt")
    else:
        prompt, completion = _split_last_reply(row)
    return [{"prompt": prompt, "completion": _text(completion, "completion"), "label": _label(row["label"])}]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowError("must be a non-empty string.", field=field)
    return value


# sources ----------------------------------------------------------------------------------------------------
def _convert(raw: Any, kind: str, file: str, line: int | None, columns: dict[str, str] | None) -> list[dict]:
    if columns and isinstance(raw, dict):
        raw = {columns.get(k, k): v for k, v in raw.items()}
    try:
        rows = to_unpaired(raw) if kind == "kto" else [to_pair(raw)]
    except RowError as exc:
        raise MartletError(exc.message, file=file, line=line, field=exc.field, hint=exc.hint) from None
    where = f"{file}:{line}" if line is not None else file
    return [{**row, "where": where} for row in rows]


def _builtin(name: str, entry: dict[str, Any], count: int | None, seed: int, names: Sequence[str],
             authors: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the generated sets in builtin/pref_*.py."""
    kind = entry["builtin"]
    if kind not in ("pref_math", "pref_identity"):
        raise MartletError(f"dataset '{name}' is not a preference dataset.", field="dataset",
                           hint="Preference training needs chosen/rejected pairs (`martlet list-datasets`: pref-*).")
    if kind == "pref_math":
        return pref_math.generate(count or entry.get("count", 2000), seed=seed, lang=entry.get("lang", "mixed"))
    if not names or not authors:
        field = "model_name" if not names else "model_author"
        raise MartletError(f"dataset '{name}' needs --{field}.", field=field,
                           hint=f"For example: --{field} 小鹦 Martlet (a Chinese and an English one).")
    return pref_identity.generate(names, authors, seed=seed)


def _raw_rows(name: str, entry: dict[str, Any] | None) -> list[tuple[str, int | None, Any]]:
    """(file, line, raw row) of a registered file/rows/hub entry or of a local file."""
    if entry is not None and entry.get("rows") is not None:
        return [(name, i, r) for i, r in enumerate(entry["rows"], start=1)]
    path = entry.get("path") if entry is not None else os.path.expanduser(name)
    if path and os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in READERS:
            raise MartletError(f"unsupported file type '{ext}': use .jsonl, .json or .csv.", file=path)
        return [(path, line, raw) for line, raw in READERS[ext](path)]
    hub_id = entry.get("hf_id") if entry is not None else (name if looks_like_hub_id(name) else None)
    if hub_id is None:
        if path and (entry is not None or os.path.splitext(name)[1].lower() in READERS or os.sep in name):
            raise MartletError("dataset file not found.", file=path, field="dataset")
        raise MartletError(f"unknown dataset '{name}'.{did_you_mean(name, dataset_registry())}", field="dataset",
                           hint="`martlet list-datasets` lists the built-in names; a file path must exist.")
    try:
        import datasets

        data = datasets.load_dataset(hub_id, split="train")
    except Exception as exc:  # offline, missing, auth: many classes
        raise MartletError(f"cannot load dataset '{name}' ({hub_id}) from the hub: {str(exc).splitlines()[0]}",
                           field="dataset", hint="Without a network, pass a local file instead.") from None
    return [(f"{hub_id}[train]", i, dict(r)) for i, r in enumerate(data, start=1)]


def load_preference_rows(spec: str, *, kind: str = "pair", seed: int = 42, model_name: Sequence[str] = (),
                         model_author: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Canonical preference rows (pairs, or KTO rows when kind='kto') of one --dataset entry (`name#N` too)."""
    name, count = parse_spec(spec)
    found = find_registered(name)
    if found is not None and found[1].get("builtin"):
        raws = [(found[0], i, r) for i, r in enumerate(_builtin(*found, count, seed, model_name, model_author), 1)]
        if found[1]["builtin"] == "pref_math":
            count = None  # generated to size
    else:
        raws = _raw_rows(found[0] if found else name, found[1] if found else None)
    if not raws:
        raise MartletError("the dataset is empty.", file=name, field="dataset")
    columns = found[1].get("columns") if found else None
    units, errors = [], []  # every row is checked, then N of them are taken (a pair gives two KTO rows)
    for file, line, raw in raws:
        try:
            if isinstance(raw, MartletError):  # a line the reader could not parse
                raise raw
            units.append(_convert(raw, kind, file, line, columns))
        except MartletError as exc:
            errors.append(exc)
    if errors:
        raise DatasetErrors(errors)
    return [row for unit in sample_rows(units, count, seed) for row in unit]


def is_preference_set(spec: str) -> bool:
    """True for a built-in preference set (pref-*: generated chosen/rejected pairs)."""
    found = find_registered(parse_spec(spec)[0])
    return found is not None and str(found[1].get("builtin", "")).startswith("pref_")


def chosen_conversations(spec: str, *, seed: int = 42, model_name: Sequence[str] = (),
                         model_author: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A preference set read as conversations (`martlet sft` on pref-*): each pair's prompt and chosen reply."""
    pairs = load_preference_rows(spec, seed=seed, model_name=model_name, model_author=model_author)
    return [{"messages": p["prompt"] + [{"role": "assistant", "content": p["chosen"]}], "where": p["where"]}
            for p in pairs]


def preference_train_val_rows(args: RLHFArguments) -> tuple[list[dict], list[dict]]:
    """Training and validation rows for preference training, split like SFT's."""
    kind = "kto" if args.rlhf_type == "kto" else "pair"
    load = lambda specs: [r for s in specs for r in load_preference_rows(  # noqa: E731
        s, kind=kind, seed=args.dataset_seed, model_name=args.model_name, model_author=args.model_author)]
    rows = load(args.dataset)
    if args.val_dataset:
        train, val = rows, load(args.val_dataset)
    else:  # split by source row, so the two KTO rows of a pair stay on one side
        units = [list(group) for _, group in itertools.groupby(rows, key=lambda row: row["where"])]
        train_units, val_units = split_train_val(units, args.dataset_test_ratio, args.dataset_seed)
        train, val = [r for u in train_units for r in u], [r for u in val_units for r in u]
    if 0 <= args.train_dataset_sample < len(train):
        train = train[: args.train_dataset_sample]
    if args.val_dataset_sample is not None:
        val = val[: args.val_dataset_sample]
    return train, val


def reference_conversations(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference rows as conversations to evaluate, one per source row (by `where`): the prompt, then the
    preferred reply as the label, i.e. a pair's chosen reply or the completion of a KTO row whose label is
    true. A source row with only an undesirable completion gives its prompt alone (answered, no label)."""
    conversations = []
    for where, group in itertools.groupby(rows, key=lambda row: row["where"]):
        group = list(group)
        preferred = next((r.get("chosen", r.get("completion")) for r in group if r.get("label", True)), None)
        reply = [{"role": "assistant", "content": preferred}] if preferred is not None else []
        conversations.append({"messages": list(group[0]["prompt"]) + reply, "where": where})
    return conversations


# encoding ---------------------------------------------------------------------------------------------------
def _prompt_and_reply(template: Template, prompt: list[dict[str, str]], reply: str) -> tuple[list[int], list[int]]:
    """Template.encode(prompt + reply) cut where the final reply starts; tokens after its end-of-turn marker
    (e.g. a newline) are left out, so exactly the reply's loss tokens count."""
    enc = template.encode(list(prompt) + [{"role": "assistant", "content": reply}])
    end = max(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and enc.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return enc.input_ids[:start], enc.input_ids[start:end]


def encode_preference(row: dict[str, Any], template: Template, max_length: int | None = None,
                      truncation_strategy: str = "delete") -> dict[str, Any] | None:
    """prompt_ids + chosen_ids/rejected_ids (pairs) or completion_ids/label (KTO); None when too long."""
    replies = ("chosen", "rejected") if "chosen" in row else ("completion",)
    prompt_ids: list[int] | None = None
    out: dict[str, Any] = {}
    for key in replies:
        ids, out[f"{key}_ids"] = _prompt_and_reply(template, row["prompt"], row[key])
        if prompt_ids is not None and ids != prompt_ids:
            raise MartletError(f"template '{template.template_type}' renders the prompt differently for the chosen "
                               "and the rejected reply, so they cannot share it.", field="template_type")
        prompt_ids = ids
    assert prompt_ids is not None
    longest = max(len(out[f"{key}_ids"]) for key in replies)
    if max_length is not None and len(prompt_ids) + longest > max_length:
        cut = len(prompt_ids) + longest - max_length
        if truncation_strategy == "delete" or cut >= len(prompt_ids):
            return None
        prompt_ids = prompt_ids[cut:]  # truncation_left: drop the oldest prompt tokens
    out["prompt_ids"] = prompt_ids
    if "label" in row:
        out["label"] = bool(row["label"])
    return out


def encode_preference_rows(rows: list[dict[str, Any]], template: Template, *, max_length: int | None,
                           truncation_strategy: str = "delete", what: str = "train",
                           interleave_seed: int | None = None, cache: bool = True):
    """A `datasets.Dataset` of encoded rows and its length statistics; rows longer than max_length are dropped.
    `interleave_seed` (KTO) orders the rows as shuffled desirable and undesirable ones in turn. Cached like SFT
    rows (see `cached_encoding`): a second run, or a second rank, reads them back."""
    import datasets

    def build():
        encoded = []
        for row in rows:
            try:
                enc = encode_preference(row, template, max_length, truncation_strategy)
            except MartletError as exc:
                raise MartletError(f"{row.get('where')}: {exc}") from None
            if enc is not None:
                encoded.append(enc)
        if interleave_seed is not None:  # KTO reads its data in order: its KL term pairs neighbours in a batch
            rng = random.Random(interleave_seed)
            good, bad = [e for e in encoded if e["label"]], [e for e in encoded if not e["label"]]
            rng.shuffle(good)
            rng.shuffle(bad)
            encoded = [e for pair in itertools.zip_longest(good, bad) for e in pair if e is not None]
        replies = [k for k in ("chosen_ids", "rejected_ids", "completion_ids") if encoded and k in encoded[0]]
        stats = length_stats([len(e["prompt_ids"]) + max(len(e[k]) for k in replies) for e in encoded])
        stats.update(rows=len(rows), kept=len(encoded), dropped=len(rows) - len(encoded))
        return datasets.Dataset.from_list(encoded), stats

    def report(stats: dict[str, Any]) -> None:
        if stats["dropped"]:
            logger.warning("%s: %d of %d rows are longer than max_length=%s and were dropped.", what,
                           stats["dropped"], len(rows), max_length)
        logger.info("%s: %s", what, ", ".join(f"{k}={v}" for k, v in stats.items()))
        if not stats["kept"]:
            raise MartletError(f"no {what} rows left: all {len(rows)} are longer than max_length={max_length}.",
                               field="max_length",
                               hint="Raise --max_length or use --truncation_strategy truncation_left.")

    key = ["preference", max_length, truncation_strategy, interleave_seed]
    return cached_encoding(rows, template, key, build, report, what=what, cache=cache, code=[__file__])

"""GRPO's view of the data: one prompt per row (the conversation without a final reply) plus every extra column,
which reaches the reward functions as a keyword argument.

The built-in math word problems come with `solution` (the checked final answer). Where the rewards read the answer
line (`accuracy`, `format`), the prompt asks for it in the words of `rewards.ANSWER_INSTRUCTION`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from martlet.data.formats import FORMATS
from martlet.data.preprocess import load_rows
from martlet.data.sources import (READERS, canonical_rows, find_registered, math_entry_rows, parse_spec, sample_rows,
                                  split_train_val)
from martlet.errors import MartletError
from martlet.train import rewards

# the columns a row format reads (they make the prompt; every other column is the reward functions')
FORMAT_KEYS = {key for _, keys, _ in FORMATS for key in keys} | {"system", "history", "input", "output", "tools"}
ANSWER_REWARDS = ("accuracy", "format")


def math_rows(entry: dict[str, Any], count: int | None, seed: int) -> list[dict[str, Any]]:
    """The built-in math word problems as GRPO rows: the question, and its checked answer as `solution`."""
    raws = math_entry_rows(entry, count, seed)
    return [{"prompt": [{"role": "user", "content": r["query"]}], "solution": r["answer"]} for r in raws]


def _prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def file_rows(path: str, name: str, columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json/.csv file: the prompt from its format (messages, query, ...) plus its other columns;
    bad rows reported together with file:line."""
    reader = READERS.get(os.path.splitext(path)[1].lower())
    if reader is None:
        raise MartletError(f"grpo reads .jsonl, .json or .csv files, not {os.path.basename(path)}.", file=name,
                           field="dataset")
    raws = [(line, {columns.get(k, k): v for k, v in raw.items()} if columns and isinstance(raw, dict) else raw)
            for line, raw in reader(path)]
    canonical = canonical_rows((name, line, raw) for line, raw in raws)
    rows = []
    for (_, raw), row in zip(raws, canonical):
        if "messages" not in row:
            raise MartletError("a grpo row needs a prompt (messages, query, ...), not plain text.", file=name,
                               field="dataset")
        extras = {k: v for k, v in raw.items() if k not in FORMAT_KEYS}
        rows.append({"prompt": _prompt(row["messages"]), **extras})
    return rows


def grpo_rows(spec: str, *, seed: int) -> list[dict[str, Any]]:
    """GRPO rows of one --dataset entry: a built-in math set, a registered file or rows, or a file; other sources
    (hub sets, built-in conversations) give their prompts alone."""
    name, count = parse_spec(spec)
    found = find_registered(name)
    if found is not None:
        key, entry = found
        if entry.get("builtin") == "math":
            return math_rows(entry, count, seed)
        if entry.get("path"):
            return sample_rows(file_rows(entry["path"], key, entry.get("columns")), count, seed)
    elif os.path.isfile(os.path.expanduser(name)):
        return sample_rows(file_rows(os.path.expanduser(name), name), count, seed)
    return [{"prompt": _prompt(row["messages"])} for row in load_rows([spec], seed=seed) if "messages" in row]


def with_instruction(row: dict[str, Any]) -> dict[str, Any]:
    """The row with the answer format the built-in rewards check added to its last user message."""
    prompt = [dict(m) for m in row["prompt"]]
    last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    prompt[last]["content"] = rewards.with_answer_instruction(prompt[last]["content"])
    return {**row, "prompt": prompt}


def grpo_train_val_rows(specs: Sequence[str], val_specs: Sequence[str], *, seed: int, test_ratio: float,
                        reward_names: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows (held-out: split off as SFT does, or --val_dataset), the answer instruction
    added when a built-in reward reads the answer line."""
    rows = [row for spec in specs for row in grpo_rows(spec, seed=seed)]
    if not rows:
        raise MartletError("the dataset holds no prompts.", field="dataset")
    if val_specs:
        train, val = rows, [row for spec in val_specs for row in grpo_rows(spec, seed=seed)]
    else:
        train, val = split_train_val(rows, test_ratio, seed) if test_ratio > 0 and len(rows) > 1 else (rows, [])
    if any(name in ANSWER_REWARDS for name in reward_names):
        train, val = [with_instruction(r) for r in train], [with_instruction(r) for r in val]
    columns = sorted({key for row in train for key in row})
    missing = sorted({key for row in train for key in columns if key not in row})
    if missing:
        raise MartletError(f"some rows lack the column(s) {', '.join(missing)}: every row needs the same columns.",
                           field="dataset")
    return train, val

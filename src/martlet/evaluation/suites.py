"""The built-in suites: held-out questions with the answer each reply is graded against, all offline.

* `math-en`, `math-zh`: generated word problems of every kind (math_gen), seeded apart from training.
* `math-easy-en`, `math-easy-zh`: two-number arithmetic only (addition, subtraction, multiplication).
* `math-small-en`, `math-small-zh`: the same with one-digit numbers (sums, differences of numbers up to 18, the
  times table): easy enough that a 135M model gets some right, so that training can show a gain.
* `self-cognition`: "who are you?" / "who made you?" phrasings that the training set does not hold; a reply
  passes when it contains the expected name or author (the Chinese one for a Chinese question).

Held out means: no question equals one of the first `TRAIN_ROWS_CHECKED` rows the math built-ins
(`--dataset math-word-problems[-easy|-small][-en|-zh]`) give at the default `--dataset_seed`; such a row is
dropped from a suite. The easy and small suites draw their questions from a share that those levels' training
rows never hold (`math_gen.held_out`): their few distinct questions would otherwise nearly all be training
questions. The same arguments always give the same questions.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Sequence

from martlet.args.data import DataArguments
from martlet.data.builtin import math_gen
from martlet.errors import MartletError
from martlet.evaluation.grading import is_correct_number, names_expected
from martlet.train import rewards

EVAL_SEED = 20261211  # far from the seeds people train with (42, 0, 1, ...)
TRAIN_SEED = next(f.default for f in dataclasses.fields(DataArguments) if f.name == "dataset_seed")
TRAIN_ROWS_CHECKED = 10000
DEFAULT_LIMIT = 100
# suite -> (language, math_gen level)
MATH_SUITES = {"math-en": ("en", "all"), "math-zh": ("zh", "all"), "math-easy-en": ("en", "easy"),
               "math-easy-zh": ("zh", "easy"), "math-small-en": ("en", "small"), "math-small-zh": ("zh", "small")}
_HELDOUT_FILE = os.path.join(os.path.dirname(__file__), "self_cognition_heldout.jsonl")


@dataclasses.dataclass(frozen=True)
class Question:
    """One question of a suite: the conversation to answer and what a correct reply holds."""

    messages: tuple  # ({"role": "user", "content": ...},)
    expected: str  # the exact answer ("38", "5/6"), or the name or author the reply must contain
    grading: str  # "number": the reply's final number equals `expected`; "contains": the reply contains it

    def is_correct(self, reply: str) -> bool:
        if self.grading == "number":
            return is_correct_number(reply, self.expected)
        return names_expected(reply, self.expected)


def suite_rows(suite: str, n: int) -> list[dict]:
    """`n` rows ({query, answer, ...}) of a math suite's kind drawn with EVAL_SEED (easy and small levels: from the
    share of questions their training rows never hold)."""
    lang, level = MATH_SUITES[suite]
    return math_gen.generate(n, seed=EVAL_SEED, lang=lang, level=level, heldout=level != "all")


@functools.lru_cache(maxsize=None)
def training_queries() -> frozenset:
    """The questions of the first TRAIN_ROWS_CHECKED rows the math built-ins of every level and language give at
    the default seed (levels share questions: a small product can be an easy one)."""
    return frozenset(row["query"] for level in math_gen.LEVELS for lang in math_gen.LANGS
                     for row in math_gen.generate(TRAIN_ROWS_CHECKED, seed=TRAIN_SEED, lang=lang, level=level))


def math_questions(suite: str, limit: int, answer_instruction: bool = False) -> list[Question]:
    """The first `limit` held-out questions of a math suite (the same ones for every run); with
    `answer_instruction`, each ends with the answer-line instruction GRPO's prompts carry."""
    seen = training_queries()
    kept = [row for row in suite_rows(suite, limit * 2 + 50) if row["query"] not in seen][:limit]
    ask = rewards.with_answer_instruction if answer_instruction else str
    return [Question(({"role": "user", "content": ask(row["query"])},), row["answer"], "number") for row in kept]


def self_cognition_questions(limit: int, model_name: Sequence[str], model_author: Sequence[str]) -> list[Question]:
    """Held-out identity questions; a Chinese question expects the first name given, an English one the last."""
    for field, values in (("model_name", model_name), ("model_author", model_author)):
        if not values:
            raise MartletError("the self-cognition suite needs the name and author the model should give.",
                               field=field, hint="Pass --model_name and --model_author (e.g. --model_name 小鹦 "
                                                 "Martlet --model_author 鸟社 Birdhouse), or a --ckpt_dir "
                                                 "trained with them.")
    groups: dict[tuple, list[Question]] = {}  # (lang, expect) -> questions, taken in turn: any limit mixes them
    with open(_HELDOUT_FILE, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            values = model_name if row["expect"] == "name" else model_author
            expected = values[0] if row["lang"] == "zh" else values[-1]
            question = Question(({"role": "user", "content": row["query"]},), expected, "contains")
            groups.setdefault((row["expect"], row["lang"]), []).append(question)
    mixed = [q for turn in itertools.zip_longest(*groups.values()) for q in turn if q is not None]
    return mixed[:limit]


def builtin_questions(suite: str, limit: int | None = None, *, model_name: Sequence[str] = (),
                      model_author: Sequence[str] = (), answer_instruction: bool = False) -> list[Question]:
    """The questions of a built-in suite: at most `limit` (default DEFAULT_LIMIT)."""
    limit = limit or DEFAULT_LIMIT
    if suite == "self-cognition":
        return self_cognition_questions(limit, model_name, model_author)
    if suite not in MATH_SUITES:
        raise MartletError(f"unknown built-in suite '{suite}'.", field="eval_dataset",
                           hint=f"Built-in suites: {', '.join([*MATH_SUITES, 'self-cognition'])}.")
    return math_questions(suite, limit, answer_instruction)

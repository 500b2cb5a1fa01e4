"""Math preference pairs: chosen = a checked worked answer of `math_gen.py`, rejected = the same solution with
a plausible slip in its result.

Each row looks like::

    {"query": "...", "chosen": "...\\n23 + 15 = 38\\nAnswer: 38", "rejected": "...\\n23 + 15 = 39\\nAnswer: 39",
     "answer": "38", "wrong": "39", "lang": "en", "meta": {...}}

The wrong result replaces the right one wherever a step states it (after "=") and in the answer line, so the
rejected reply reads like a careless but confident solution. Every pair is checked: the wrong value differs
from the right one and is positive, and only the stated results changed. Stdlib only; the same arguments
always give the same rows.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from martlet.data.builtin import math_gen

__all__ = ["generate", "wrong_value", "corrupt"]


def _check(cond: bool, what: str) -> None:
    if not cond:  # explicit raise so the checks survive `python -O`
        raise AssertionError(f"pref_math self-check failed: {what}")


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def wrong_value(answer: str, rng: random.Random) -> str:
    """A plausible wrong result: off by one, two or ten, digits swapped, or a fraction slightly off."""
    right = Fraction(answer)
    if right.denominator == 1:
        n = right.numerator
        candidates = [n + d for d in (1, -1, 2, -2, 10, -10)]
        if n >= 10 and str(n)[::-1] != str(n):
            candidates.append(int(str(n)[::-1].lstrip("0") or "0"))
        values = [Fraction(c) for c in candidates]
    else:
        p, q = right.numerator, right.denominator
        values = [Fraction(p + 1, q), Fraction(p, q + 1), Fraction(p + q, q), Fraction(p, q * 2)]
    values = [v for v in values if v > 0 and v != right]
    wrong = rng.choice(values)
    _check(wrong != right and wrong > 0, "wrong value differs")
    return _fmt(wrong)


def corrupt(response: str, answer: str, wrong: str) -> str:
    """`response` with the stated result `answer` (after '=' or in the answer line) replaced by `wrong`."""
    pattern = re.compile(r"(=\s*\$?|Answer: |答案：)" + re.escape(answer) + r"(?![\d/.])")
    return pattern.sub(lambda m: m.group(1) + wrong, response)


def generate(n: int, seed: int = 42, lang: str = "mixed") -> list[dict]:
    """`n` checked pairs (same problems as `math_gen.generate(n, seed, lang)`)."""
    rng = random.Random(f"pref-math-{seed}")
    rows = []
    for row in math_gen.generate(n, seed=seed, lang=lang):
        wrong = wrong_value(row["answer"], rng)
        rejected = corrupt(row["response"], row["answer"], wrong)
        last = rejected.rsplit("\n", 1)[-1]
        _check(last in (f"Answer: {wrong}", f"答案：{wrong}"), f"answer line of {row['query']!r}")
        _check(rejected.count("\n") == row["response"].count("\n") and rejected != row["response"], "one slip")
        rows.append({"query": row["query"], "chosen": row["response"], "rejected": rejected,
                     "answer": row["answer"], "wrong": wrong, "lang": row["lang"], "meta": row["meta"]})
    return rows


if __name__ == "__main__":
    import json
    import sys

    for item in generate(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        print(json.dumps(item, ensure_ascii=False))

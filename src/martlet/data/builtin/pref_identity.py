"""Identity preference pairs: the self-cognition questions, answered with the model's own name and author
(chosen) or with another assistant's (rejected, from `pref_identities.json`).

Each row looks like::

    {"query": "Who are you?", "chosen": "I'm Martlet, an AI assistant created by Birdhouse. ...",
     "rejected": "I'm ChatGPT, an AI assistant created by OpenAI. ...", "lang": "en"}

Both replies come from the same template sentence, so a pair differs only in the identity. Stdlib only;
the same arguments always give the same rows.
"""

from __future__ import annotations

import json
import os
import random
from typing import Sequence

_DIR = os.path.dirname(os.path.abspath(__file__))


def generate(names: Sequence[str], authors: Sequence[str], seed: int = 42) -> list[dict]:
    """One pair per self-cognition row; names/authors: one value, or a Chinese and an English one."""
    with open(os.path.join(_DIR, "pref_identities.json"), encoding="utf-8") as fh:
        others = json.load(fh)
    rng = random.Random(seed)
    rows = []
    with open(os.path.join(_DIR, "self_cognition.jsonl"), encoding="utf-8") as fh:
        for raw in map(json.loads, fh):
            lang = "zh" if raw.get("lang") == "zh" else "en"
            mine = (names[0], authors[0]) if lang == "zh" else (names[-1], authors[-1])
            other = rng.choice([o for o in others[lang] if o[0] != mine[0]])

            def fill(text: str, who: Sequence[str]) -> str:
                return text.replace("{{NAME}}", who[0]).replace("{{AUTHOR}}", who[1])

            chosen, rejected = fill(raw["response"], mine), fill(raw["response"], other)
            if chosen == rejected:  # a template without the identity in it: no preference to learn
                raise AssertionError(f"pref_identity self-check failed: {raw['response']!r}")
            rows.append({"query": fill(raw["query"], mine), "chosen": chosen, "rejected": rejected, "lang": lang})
    return rows

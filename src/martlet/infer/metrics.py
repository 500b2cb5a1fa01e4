"""Metrics of generated replies against labels: exact match, ROUGE-L (F) and BLEU-4.

Text is split into words by jieba, which segments Chinese into words and leaves English words,
numbers and punctuation as they are (spaces dropped; case kept). ROUGE-L comes from `rouge-score`
(given those tokens: its own tokenizer deletes every non-ASCII character), BLEU-4 from nltk's
`sentence_bleu` with smoothing method 3 (as in the common Chinese LLM evaluations).
"""

from __future__ import annotations

import functools
from typing import Sequence

from martlet.errors import MartletError


@functools.lru_cache(maxsize=1)
def _jieba():
    try:
        import logging

        import jieba
    except ImportError:
        raise MartletError("metrics need jieba, rouge-score and nltk.", hint="pip install 'martlet[eval]'") from None
    jieba.setLogLevel(logging.WARNING)
    return jieba


def words(text: str) -> list[str]:
    """`text` as words: Chinese segmented, spaces dropped."""
    return [w for w in _jieba().lcut(text) if w.strip()]


class _Words:
    """The tokenizer object rouge-score asks for."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def rouge_l(response: str, label: str) -> float:
    from rouge_score import rouge_scorer

    hyp, ref = words(response), words(label)
    if not hyp or not ref:
        return float(hyp == ref)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())
    return scorer.score(label, response)["rougeL"].fmeasure


def bleu_4(response: str, label: str) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp, ref = words(response), words(label)
    if not hyp or not ref:
        return float(hyp == ref)
    return float(sentence_bleu([ref], hyp, weights=(0.25, 0.25, 0.25, 0.25),
                              smoothing_function=SmoothingFunction().method3))


def exact_match(response: str, label: str) -> float:
    return float(response.strip() == label.strip())


def compute_metrics(responses: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Means over the pairs, rounded to 4 places, with their count."""
    if len(responses) != len(labels):
        raise ValueError("responses and labels differ in length")
    n = len(responses)
    if n == 0:
        return {"count": 0}
    pairs = list(zip(responses, labels))
    return {"count": n,
            "exact_match": round(sum(exact_match(r, l) for r, l in pairs) / n, 4),
            "rouge-l": round(sum(rouge_l(r, l) for r, l in pairs) / n, 4),
            "bleu-4": round(sum(bleu_4(r, l) for r, l in pairs) / n, 4)}

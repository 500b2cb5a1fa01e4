"""Grading replies: the final number of a math reply, and whether a reply names the expected name.

`final_number` reads what a reader would take as the answer: the first number after the last answer marker
("Answer:", "答案：", "答案是", "The answer is", "####", "\\boxed{"), else the last number of the reply. After a
marker, an equation's result wins: "The answer is 3 + 8 = 11." reads 11.
Numbers may carry thousands commas, a sign, decimals or a fraction bar; full-width digits and punctuation
(１２，３４５．５) are read as their ASCII forms.
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction
from typing import Optional

_MARKERS = re.compile(r"(?:answer\s*(?:is|:)|答案\s*(?:是|为|:)?|####|\\boxed\s*\{)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[。！？；\n]|[.!?;](?=\s|$)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")


def _numbers(text: str) -> list[Fraction]:
    found = []
    for match in _NUMBER.finditer(text):
        token = match.group().replace(",", "").replace(" ", "")
        start = match.start()
        if token.startswith("-") and start > 0 and (text[start - 1].isalnum() or text[start - 1] in ")]"):
            token = token[1:]  # "10-5": a minus between numbers, not a sign
        numerator, _, denominator = token.partition("/")
        try:
            value = Fraction(numerator) / Fraction(denominator) if denominator else Fraction(numerator)
        except ZeroDivisionError:
            continue
        found.append(value)
    return found


def _answer_after(text: str) -> Optional[Fraction]:
    """The answer that follows a marker: in the sentence after it, the number after its last '=' ("the answer
    is 3 + 8 = 11 pages"), else the sentence's first number, else the first number further on."""
    end = _SENTENCE_END.search(text)
    sentence = text[:end.start()] if end else text
    for part in (sentence.rpartition("=")[2], sentence, text):
        numbers = _numbers(part)
        if numbers:
            return numbers[0]
    return None


def final_number(reply: str) -> Optional[Fraction]:
    """The answer a reply gives as an exact number, or None when it holds no number."""
    text = unicodedata.normalize("NFKC", reply)
    markers = list(_MARKERS.finditer(text))
    if markers:
        after = _answer_after(text[markers[-1].end():])
        if after is not None:
            return after
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def is_correct_number(reply: str, answer: str) -> bool:
    """Whether the reply's final number equals `answer` ("38", "-4", "2.5", "5/6")."""
    got = final_number(reply)
    return got is not None and got == Fraction(answer)


def names_expected(reply: str, expected: str) -> bool:
    """Whether the reply contains `expected` (a name or an author), ignoring case and full-width forms."""
    normalize = lambda text: unicodedata.normalize("NFKC", text).casefold()  # noqa: E731
    return normalize(expected) in normalize(reply)

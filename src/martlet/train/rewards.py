"""GRPO's reward functions: the built-in `accuracy` and `format`, the ones users register, and the checks that
refuse a bad one before training.

A reward function is called as trl calls it: `func(prompts=..., completions=..., completion_ids=..., **columns)`,
where every extra column of the dataset (`solution`, for example) comes as a keyword argument holding one value per
completion; it returns one number (or None: "does not apply") per completion.

The answer format is written once, here: `ANSWER_INSTRUCTION` is what GRPO's prompt asks for, and `format` and
`accuracy` read that same line, so prompt and reward never disagree.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from fractions import Fraction
from typing import Any, Callable, Sequence

from martlet.errors import MartletError

RewardFunc = Callable[..., Sequence[Any]]

# what trl passes every reward function besides the dataset's columns
TRL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments")
# the prompt's answer instruction, by language, and an answer that follows it (tests: reward 1 for both rewards)
ANSWER_INSTRUCTION = {
    "en": "Solve it in one or two short lines, then write the final line as 'Answer: <number>'.",
    "zh": "用一两行简短地解答，最后一行写成“答案：<数字>”。",
}
ANSWER_EXAMPLE = {"en": "{a} + {b} = {c}\nAnswer: {c}", "zh": "{a} + {b} = {c}\n答案：{c}"}
_ANSWER_LINE = re.compile(r"^\s*(?:Answer|answer|ANSWER|答案)\s*[:：]\s*(?P<value>.+?)\s*$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")
_CJK = re.compile(r"[\u4e00-\u9fff]")


def prompt_language(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def with_answer_instruction(query: str) -> str:
    """The user's question with the answer format the `format` reward checks, in the question's language."""
    return f"{query}\n{ANSWER_INSTRUCTION[prompt_language(query)]}"


def completion_text(completion: Any) -> str:
    """A completion as text: trl passes a string, or (conversational prompts) a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


def answer_line(text: str) -> str | None:
    """The value of the reply's last non-empty line when that line is 'Answer: ...' (or '答案：...'), else None."""
    lines = [line for line in text.splitlines() if line.strip()]
    match = _ANSWER_LINE.match(lines[-1]) if lines else None
    return match["value"] if match else None


def parse_number(text: str) -> Fraction | None:
    """The last number in `text` ('1,234', '-3.5', '5/6', '$12.'), exactly, or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Fraction(found[-1].replace(",", "").replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(text: str) -> str:
    """What a reply answers: its answer line's value when it has one, else the whole reply (its last number)."""
    value = answer_line(text)
    return value if value is not None else text


def _expression_equal(predicted: str, solution: str) -> bool | None:
    """math-verify's judgement of two expressions, when it is installed (None otherwise)."""
    if importlib.util.find_spec("math_verify") is None:
        return None
    import math_verify

    return bool(math_verify.verify(math_verify.parse(solution), math_verify.parse(predicted)))


def is_correct(text: str, solution: Any) -> bool:
    """The reply's final number equals the solution's (exact fractions), read as `martlet eval` grades it, so the
    reward and the evaluation agree; a solution that is not a number is compared by math-verify when installed,
    else as text."""
    from martlet.evaluation.grading import final_number  # here: martlet.evaluation imports this module

    wanted = parse_number(str(solution))
    if wanted is not None and _NUMBER.fullmatch(str(solution).strip().replace(" ", "")):
        return final_number(text) == wanted
    predicted = final_answer(text)
    verdict = _expression_equal(predicted, str(solution))
    return verdict if verdict is not None else predicted.strip() == str(solution).strip()


def accuracy(completions: Sequence[Any], solution: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 where the completion's final answer equals the row's `solution`, else 0.0."""
    return [float(is_correct(completion_text(c), s)) for c, s in zip(completions, solution)]


def format(completions: Sequence[Any], **kwargs: Any) -> list[float]:  # noqa: A001 - the reward's public name
    """1.0 where the completion ends with the answer line the prompt asks for (`ANSWER_INSTRUCTION`), holding a
    number, else 0.0."""
    values = (answer_line(completion_text(c)) for c in completions)
    return [float(v is not None and _NUMBER.fullmatch(v.strip(" .$").replace(" ", "")) is not None) for v in values]


_REGISTRY: dict[str, RewardFunc] = {"accuracy": accuracy, "format": format}


def register_reward_func(name: str, func: RewardFunc) -> None:
    """Make `func` usable as `--reward_funcs name` (from Python, or in a --custom_register_path file)."""
    if not callable(func):
        raise MartletError(f"reward function {name!r} is not callable.", field="reward_funcs")
    _REGISTRY[name] = func


def reward_func(name: str) -> RewardFunc:
    if name not in _REGISTRY:
        raise MartletError(f"unknown reward function {name!r}: known are {', '.join(sorted(_REGISTRY))}.",
                           field="reward_funcs",
                           hint="Register your own with martlet.train.rewards.register_reward_func(name, func), "
                                "in a file passed with --custom_register_path.")
    func = _REGISTRY[name]
    func.__name__ = getattr(func, "__name__", name)  # trl names a function's metrics after it
    return func


def required_columns(func: RewardFunc) -> list[str]:
    """The dataset columns a reward function asks for: its parameters without a default, trl's own aside."""
    parameters = inspect.signature(func).parameters.values()
    return [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in TRL_KEYWORDS
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_columns(names: Sequence[str], columns: Sequence[str], where: str) -> None:
    """Refuse, before training, a reward function that asks for a column the data lacks, naming both."""
    for name in names:
        missing = [c for c in required_columns(reward_func(name)) if c not in columns]
        if missing:
            raise MartletError(f"reward function {name!r} needs the column(s) {', '.join(missing)}, which the "
                               f"dataset lacks (its columns: {', '.join(columns) or 'none'}).", file=where,
                               field="reward_funcs",
                               hint="Add the column to every row, or give the parameter a default value.")


def check_outputs(names: Sequence[str], rows: Sequence[dict[str, Any]], completions: Sequence[Any]) -> None:
    """Call each reward function on a first check batch (`rows` with one completion each) and refuse one that
    does not return one number (or None) per completion."""
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    for name in names:
        try:
            values = list(reward_func(name)(prompts=[row["prompt"] for row in rows], completions=list(completions),
                                            completion_ids=[[] for _ in rows], **columns))
        except Exception as exc:  # the user's code: any error, named with the function
            raise MartletError(f"reward function {name!r} failed on a check batch: {type(exc).__name__}: {exc}",
                               field="reward_funcs") from None
        if len(values) != len(rows):
            raise MartletError(f"reward function {name!r} returned {len(values)} values for {len(rows)} "
                               "completions: it must return one per completion.", field="reward_funcs")
        bad = [v for v in values if v is not None and not _is_number(v)]
        if bad:
            raise MartletError(f"reward function {name!r} returned {bad[0]!r} ({type(bad[0]).__name__}): rewards "
                               "must be numbers (or None where the reward does not apply).", field="reward_funcs")


def _is_number(value: Any) -> bool:
    try:
        return not isinstance(value, (bool, str)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False

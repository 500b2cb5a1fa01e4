"""`martlet eval` without a model: the answer parser, the built-in suites (deterministic, held out from
training), the arguments, the standard suites' errors, and the table."""

import json
import os
import re
from fractions import Fraction

import pytest

from martlet.args.eval import EvalArguments
from martlet.data import builtin
from martlet.data.builtin import math_gen
from martlet.data.sources import load_dataset_rows
from martlet.errors import MartletError
from martlet.evaluation import harness
from martlet.evaluation.grading import final_number, is_correct_number, names_expected
from martlet.evaluation.report import format_table
from martlet.evaluation.suites import MATH_SUITES, builtin_questions, math_questions
from martlet.train import rewards


@pytest.mark.parametrize("reply, number", [
    ("3 + 4 = 7, so she has 7 apples.", 7),
    ("First 12 + 30 = 42.\nAnswer: 42", 42),
    ("The total is 1,234,567 dollars.", 1234567),
    ("It dropped to -5 degrees.", -5),
    ("12 - 17 = -5", -5),
    ("10-5", 5),  # a minus between numbers is no sign
    ("Each gets 2.5 cakes.", Fraction(5, 2)),
    ("The answer is 5/6 of the pie.", Fraction(5, 6)),
    ("１２加上３０等于４２。", 42),  # full-width digits
    ("一共是１，２３４元", 1234),  # full-width comma
    ("先算 3 × 4 = 12，答案是 12，共 3 步。", 12),  # the marker wins over the last number
    ("答案：38", 38),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72),
    ("So the result is \\boxed{15}. Check: 3 * 5 = 15 in 2 steps.", 15),
    ("The answer is 7.", 7),
    ("So, the answer is 3 + 8 = 11 pages. Jack had 3 more.", 11),  # after the marker, the equation's result
    ("Answer: 14 - 7 = 7", 7),
    ("答案是 3 × 4 = 12。共 3 步。", 12),
    ("The answer is 2.5. Then 4 more.", Fraction(5, 2)),  # a decimal point ends no sentence
])
def test_final_number(reply, number):
    assert final_number(reply) == Fraction(number)


def test_no_number_and_grading():
    assert final_number("I do not know.") is None
    assert not is_correct_number("I do not know.", "3")
    assert is_correct_number("x = 5/6", "5/6") and is_correct_number("It is 2.50", "5/2")
    assert not is_correct_number("Answer: 41", "42")
    assert names_expected("I am SWALLOW, made by Nest.", "Swallow") and not names_expected("I am Qwen.", "Swallow")
    assert names_expected("我是小燕。", "小燕")


@pytest.mark.parametrize("suite", sorted(MATH_SUITES))
def test_math_suites_are_deterministic_checked_and_held_out(suite):
    questions = math_questions(suite, 100)
    assert questions == math_questions(suite, 100) and math_questions(suite, 30) == questions[:30]
    assert len(questions) == 100 and len({q.messages[0]["content"] for q in questions}) == 100
    lang = suite.rsplit("-", 1)[1]
    trained = set()
    names = [f"math-word-problems{tier}{suffix}" for tier in ("", "-easy", "-small") for suffix in ("", f"-{lang}")]
    for name in names:  # what `--dataset` trains on by default
        trained.update(row["messages"][0]["content"] for row in load_dataset_rows(name))
    assert not trained & {q.messages[0]["content"] for q in questions}
    # the grader accepts each generated row's own worked solution
    rows = {row["query"]: row for row in math_gen.generate(2000, seed=7, lang=lang, level=MATH_SUITES[suite][1])}
    for row in list(rows.values())[:200]:
        assert is_correct_number(row["response"], row["answer"]), row


@pytest.mark.parametrize("suite, largest", [("math-easy-en", 200), ("math-small-en", 9), ("math-small-zh", 9)])
def test_easy_and_small_suites_are_two_number_arithmetic(suite, largest):
    kinds = {"+": 0, "-": 0, "*": 0}
    for question in builtin_questions(suite, 30):
        text = question.messages[0]["content"]
        a, b = numbers = [int(n) for n in re.findall(r"\d+", text)]
        assert len(numbers) == 2, text
        op = next(op for op, value in {"+": a + b, "-": a - b, "*": a * b}.items() if value == int(question.expected))
        kinds[op] += 1
        assert (b if op == "-" else max(a, b)) <= largest, text  # small: one-digit numbers, a difference of two
    assert min(kinds.values()) >= 5, kinds  # all three kinds (some products are math-word-problems questions)


@pytest.mark.parametrize("suite, line", [("math-easy-en", "'Answer: <number>'"), ("math-zh", "答案：<数字>")])
def test_answer_instruction_ends_each_question_as_grpo_prompts_do(suite, line):
    plain, asked = math_questions(suite, 20), math_questions(suite, 20, answer_instruction=True)
    assert [q.expected for q in asked] == [q.expected for q in plain]
    for p, a in zip(plain, asked):
        assert a.messages[0]["content"] == rewards.with_answer_instruction(p.messages[0]["content"])
        assert a.messages[0]["content"].startswith(p.messages[0]["content"] + "\n") and line in a.messages[0]["content"]
    assert EvalArguments(eval_dataset=["math-easy-en"], answer_instruction=True).validate().answer_instruction


def test_self_cognition_suite_asks_new_questions_and_expects_the_right_language():
    with open(os.path.join(os.path.dirname(builtin.__file__), "self_cognition.jsonl"), encoding="utf-8") as fh:
        trained = {json.loads(line)["query"] for line in fh}
    questions = builtin_questions("self-cognition", model_name=["小燕", "Swallow"], model_author=["燕社", "Nest"])
    assert len(questions) == 20 and not trained & {q.messages[0]["content"] for q in questions}
    assert {q.expected for q in questions} == {"小燕", "Swallow", "燕社", "Nest"}
    for q in questions:
        chinese = any("\u4e00" <= ch <= "\u9fff" for ch in q.messages[0]["content"])
        assert (q.expected in ("小燕", "燕社")) == chinese
    first = builtin_questions("self-cognition", 4, model_name=["小燕", "Swallow"], model_author=["燕社", "Nest"])
    assert sorted(q.expected for q in first) == sorted(["小燕", "Swallow", "燕社", "Nest"])  # a limit mixes them
    assert questions[:4] == first
    with pytest.raises(MartletError, match="--model_name and --model_author"):
        builtin_questions("self-cognition", model_name=["X"])


@pytest.mark.parametrize("kwargs, field", [
    ({"eval_base": True}, "eval_base"),
    ({"eval_dataset": []}, "eval_dataset"),
    ({"eval_limit": 0}, "eval_limit"),
    ({"ckpt_dir": "/no/such/folder"}, "ckpt_dir"),
])
def test_arguments_name_the_field(kwargs, field):
    with pytest.raises(MartletError) as err:
        EvalArguments(**kwargs).validate()
    assert err.value.field == field


def test_unknown_suite_is_refused_on_the_command_line():
    from martlet.args.base import parse_cli

    with pytest.raises(MartletError, match="gsm8k"):
        parse_cli(EvalArguments, ["--eval_dataset", "gsm8"])


def test_standard_suites_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MartletError) as err:
        harness.check_harness(["gsm8k", "mmlu"])
    text = str(err.value)
    assert "HF_HUB_OFFLINE=1" in text and "gsm8k, mmlu" in text and "\n" not in text
    harness.check_harness([])  # built-in suites only: nothing to check


def test_standard_suites_without_lm_eval_name_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    with pytest.raises(MartletError) as err:
        harness.check_harness(["ceval"])
    assert "pip install 'martlet[eval-harness]'" in str(err.value) and "\n" not in str(err.value)


def test_table_has_a_row_per_suite_and_a_column_per_model():
    table = format_table({"base": {"math-en": {"accuracy": 0.1, "correct": 1, "total": 10}},
                          "tuned": {"math-en": {"accuracy": 0.5, "correct": 5, "total": 10},
                                    "gsm8k": {"accuracy": 0.25, "correct": 2, "total": 8}}})
    lines = table.splitlines()
    assert lines[0].split() == ["suite", "base", "tuned"]
    assert lines[2].split() == ["math-en", "0.100", "(1/10)", "0.500", "(5/10)"]
    assert lines[3].split() == ["gsm8k", "-", "0.250", "(2/8)"]

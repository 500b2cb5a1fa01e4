"""`martlet eval` on the real embedded SmolLM2-135M-Instruct: accuracy on the easy arithmetic suite is computed
from its greedy replies (the GRPO learning test measures its gain on this suite)."""

import json

import pytest

from martlet.evaluation import evaluate
from martlet.evaluation.grading import is_correct_number

pytestmark = pytest.mark.slow


def test_smollm2_easy_arithmetic_accuracy(embedded_dir, tmp_path):
    result = evaluate(model_id_or_path=embedded_dir, eval_dataset=["math-easy-en"], eval_limit=16,
                      max_new_tokens=48, max_batch_size=16, output_dir=str(tmp_path))
    score = result["models"]["base"]["math-easy-en"]
    assert score["total"] == 16 and score["accuracy"] == score["correct"] / 16
    with open(result["json"], encoding="utf-8") as fh:
        records = json.load(fh)["details"]["base"]["math-easy-en"]
    assert sum(r["correct"] for r in records) == score["correct"]
    assert all(r["reply"].strip() for r in records)  # the real model answers every question
    assert all(r["correct"] == is_correct_number(r["reply"], r["expected"]) for r in records)

"""On the real SmolLM2: GRPO with LoRA on the built-in one-digit arithmetic word problems raises held-out accuracy,
measured by `martlet eval` on the base model and the tuned checkpoint side by side.

The reward is `accuracy` alone: it reads the final number as `martlet eval` grades it. The loss is Dr. GRPO's (no
division by each completion's length): with the paper's per-sequence mean, replies grew to the length cap within
15-20 steps and accuracy collapsed in one of two runs. Measured with one thread a process, as the suite runs it:
13/60 -> 28, 32, 31 and 41 of 60 (seeds 42, 7, 1, 3) with trl's
fused head scoring the completions; with Martlet's native token scores, which score them since 2026-12-06:
13 -> 42 (seed 42), and 13 -> 36 once the LoRA kernels took bf16 dot products (another trajectory). The suite's
questions come from the share the training rows never hold (`math_gen.held_out`); the test checks that none was
trained on."""

import json

import pytest

from martlet.evaluation import evaluate
from martlet.evaluation.suites import builtin_questions
from martlet.llm import RLHFArguments, rlhf_main
from martlet.train import rewards
from martlet.train.grpo_data import grpo_rows

DATASET, SUITE, QUESTIONS, TOKENS, STEPS = "math-word-problems-small-en#400", "math-small-en", 60, 48, 16


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_of_the_embedded_model(tmp_path):
    trained = {rewards.with_answer_instruction(row["prompt"][-1]["content"]) for row in grpo_rows(DATASET, seed=42)}
    asked = {q.messages[0]["content"] for q in builtin_questions(SUITE, QUESTIONS, answer_instruction=True)}
    assert len(trained) == 400 and len(asked) == QUESTIONS and not trained & asked

    result = rlhf_main(RLHFArguments(
        rlhf_type="grpo", dataset=[DATASET], reward_funcs=["accuracy"], num_generations=8, batch_size=24,
        gradient_accumulation_steps=1, max_completion_length=TOKENS, temperature=0.7, beta=0.0, learning_rate=5e-4,
        loss_type="dr_grpo", lr_scheduler_type="constant", warmup_ratio=0.0, max_steps=STEPS,
        lora_target_modules=["ALL"], gradient_checkpointing=False, dtype="bf16", dataset_test_ratio=0.0,
        logging_steps=1, save_only_model=True, report_to=["none"], disable_tqdm=True, output_dir=str(tmp_path / "out")))
    scores = evaluate(ckpt_dir=result["last_model_checkpoint"], eval_base=True, eval_dataset=[SUITE],
                      eval_limit=QUESTIONS, answer_instruction=True, max_new_tokens=TOKENS,
                      output_dir=str(tmp_path / "eval"))
    base, tuned = (scores["models"][m][SUITE] for m in ("base", "tuned"))
    steps = [h for h in result["log_history"] if "rewards/accuracy/mean" in h]
    report = {"base": base, "tuned": tuned, "train_runtime_s": round(result["log_history"][-1]["train_runtime"], 1),
              "reward_per_step": [round(h["rewards/accuracy/mean"], 2) for h in steps]}
    print("GRPO-LEARNING", json.dumps(report))
    assert len(steps) == STEPS, report
    assert tuned["correct"] >= base["correct"] + 9, report  # at least 15 points on 60 held-out questions
    assert tuned["accuracy"] >= 1.5 * base["accuracy"], report

"""GRPO: trl's advantages and loss (the code path Martlet's trainer runs) equal the paper's formulas on a hand-made
group, computed here independently in float64; the built-in rewards agree with the prompt's answer format; bad
reward functions are refused before training."""

import json
import os

import numpy as np
import pytest
import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import write_jsonl
from martlet.errors import MartletError
from martlet.llm import RLHFArguments, register_reward_func, rlhf_main
from martlet.train import rewards
from martlet.train.grpo import GRPOTrainer, grpo_config_kwargs

# two groups of four completions: one with a spread of rewards, one where every member got the same reward
HAND_MADE = [1.0, 0.0, 0.5, 0.0, 0.7, 0.7, 0.7, 0.7]
EPSILON, BETA = 0.2, 0.1


def hand_made_reward(completions, **kwargs):
    return HAND_MADE[: len(completions)]


def build_trainer(model_dir, tmp_path, loss_type="grpo"):
    args = RLHFArguments(rlhf_type="grpo", dataset=["x"], reward_funcs=["accuracy"], num_generations=4,
                         max_completion_length=5, beta=BETA, epsilon=EPSILON, loss_type=loss_type, batch_size=8,
                         gradient_accumulation_steps=1)
    config = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=1,
                            use_cpu=True, bf16=False, report_to="none", **grpo_config_kwargs(args))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}]} for i in range(2)]
    torch.manual_seed(0)
    trainer = GRPOTrainer(model=model, reward_funcs=[hand_made_reward], args=config,
                          train_dataset=Dataset.from_list(data), processing_class=tokenizer)
    batch = [row for row in data for _ in range(4)]  # trl's sampler: each prompt num_generations times in a row
    return trainer, batch


def paper_advantages(values, group):
    r = np.asarray(values, dtype=np.float64).reshape(-1, group)
    mean, std = r.mean(1, keepdims=True), r.std(1, ddof=1, keepdims=True)
    return ((r - mean) / (std + 1e-4)).reshape(-1)  # trl's epsilon in the denominator


def test_advantages_are_the_group_normalised_rewards_and_zero_for_a_flat_group(tiny_llama, tmp_path):
    trainer, batch = build_trainer(tiny_llama, tmp_path)
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    got = out["advantages"].double().numpy()
    np.testing.assert_allclose(got, paper_advantages(HAND_MADE, 4), rtol=1e-5, atol=1e-6)
    assert np.all(got[4:] == 0)  # every member got 0.7: no signal
    assert got[0] > 0 > got[1] and got[1] == got[3]
    assert trainer._metrics["train"]["frac_reward_zero_std"][-1] == 0.5


def completion_logps(model, out):
    """log pi(o_t | q, o_<t) of each completion token, float64, from a plain forward pass."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    n = out["completion_ids"].shape[1]
    logps = logits[:, -n - 1:-1].log_softmax(-1)
    return logps.gather(2, out["completion_ids"][..., None]).squeeze(-1).numpy()


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo"])
def test_loss_is_the_clipped_surrogate_minus_beta_kl(tiny_llama, tmp_path, loss_type):
    trainer, batch = build_trainer(tiny_llama, tmp_path, loss_type)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # (what the training loop sets)
    out = trainer._generate_and_score_completions(batch)
    logp = completion_logps(trainer.model, out)
    mask = out["completion_mask"].double().numpy()
    rng = np.random.default_rng(0)
    old = logp + rng.uniform(-0.5, 0.5, logp.shape)  # ratios on both sides of the clip range
    ref = logp + rng.uniform(-0.3, 0.3, logp.shape)
    out["old_per_token_logps"] = torch.tensor(old, dtype=torch.float32)
    out["ref_per_token_logps"] = torch.tensor(ref, dtype=torch.float32)
    got = trainer._compute_loss(trainer.model, out).item()

    adv = paper_advantages(HAND_MADE, 4)[:, None]
    ratio = np.exp(logp - old)
    surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - EPSILON, 1 + EPSILON) * adv)
    # the k3 estimator of KL(pi || pi_ref), times the policy ratio: trl's default (use_bias_correction_kl, the
    # unbiased reverse-KL gradient of DeepSeek-V3.2), which Martlet keeps; DeepSeekMath's GRPO has no ratio there
    kl = (np.exp(ref - logp) - (ref - logp) - 1) * ratio
    per_token = -(surrogate - BETA * kl)
    if loss_type == "grpo":  # the paper: 1/G sum_i 1/|o_i| sum_t
        want = np.mean((per_token * mask).sum(1) / mask.sum(1))
    elif loss_type == "dr_grpo":  # Dr. GRPO: a constant, G * max_completion_length
        want = (per_token * mask).sum() / (mask.shape[0] * 5)
    else:  # bnpo: the tokens of the local batch
        want = (per_token * mask).sum() / mask.sum()
    assert np.sum(np.abs(ratio - 1) > EPSILON) > 0  # the clip is exercised
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_generation_keeps_the_kv_cache(tiny_llama, tmp_path):
    trainer, batch = build_trainer(tiny_llama, tmp_path)
    trainer.model.config.use_cache = False  # as load_for_training leaves it: generation must not follow it
    seen = []
    hook = trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        trainer._generate_single_turn([[1, 2, 3], [4, 5]], None, {}, 1)
    finally:
        hook.remove()
    # the first pass reads the (left-padded) prompts, every later one a single new token: the KV cache holds the
    # rest (without it, generate feeds the whole sequence again at every token)
    assert seen[0] == 3 and len(seen) > 1 and seen[1:] == [1] * (len(seen) - 1)


@pytest.mark.parametrize("lang,a,b", [("en", 23, 15), ("zh", 41, 9)])
def test_the_prompts_example_answer_gets_both_rewards(lang, a, b):
    example = rewards.ANSWER_EXAMPLE[lang].format(a=a, b=b, c=a + b)
    query = "What is 23 plus 15?" if lang == "en" else "23加15等于多少？"
    assert rewards.ANSWER_INSTRUCTION[lang] in rewards.with_answer_instruction(query)
    completions = [[{"role": "assistant", "content": example}], example, f"{a} + {b} = {a + b}",
                   example.replace(str(a + b), str(a + b + 1))]
    assert rewards.format(completions) == [1.0, 1.0, 0.0, 1.0]
    assert rewards.accuracy(completions, solution=[str(a + b)] * 4) == [1.0, 1.0, 1.0, 0.0]


def test_accuracy_reads_fractions_and_thousands():
    assert rewards.accuracy(["so 5/6\nAnswer: 5/6", "Answer: 1,250.", "Answer: 0.5"], ["5/6", "1250", "1/2"]) == [
        1.0, 1.0, 1.0]
    assert rewards.accuracy(["no number here"], ["3"]) == [0.0]


PROMPTS = [{"messages": [{"role": "user", "content": f"What is {i} plus 2?"}], "solution": str(i + 2)}
           for i in range(6)]


def wants_a_key(completions, answer_key, **kwargs):
    return [0.0] * len(completions)


def says_yes(completions, **kwargs):
    return ["yes"] * len(completions)


def too_few(completions, **kwargs):
    return [1.0]


@pytest.mark.parametrize("func,message", [
    (wants_a_key, "needs the column(s) answer_key, which the dataset lacks (its columns: solution)"),
    (says_yes, "returned 'yes' (str): rewards must be numbers"),
    (too_few, "returned 1 values for 2 completions"),
])
def test_bad_reward_functions_are_refused_before_training(tiny_llama, tmp_path, func, message):
    register_reward_func(func.__name__, func)
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    args = RLHFArguments(rlhf_type="grpo", model_id_or_path=tiny_llama, dataset=[data],
                         reward_funcs=["accuracy", func.__name__], output_dir=str(tmp_path / "out"), batch_size=4,
                         max_steps=1, report_to=["none"], max_completion_length=4)
    with pytest.raises(MartletError) as caught:
        rlhf_main(args)
    assert message in str(caught.value) and func.__name__ in str(caught.value)
    assert not os.path.exists(tmp_path / "out")  # nothing loaded, no run folder


def test_extra_columns_reach_the_reward_functions(tmp_path):
    from martlet.train.grpo_data import grpo_train_val_rows

    data = write_jsonl(tmp_path / "p.jsonl", [{**row, "level": i % 2} for i, row in enumerate(PROMPTS)])
    train, val = grpo_train_val_rows([data], [], seed=1, test_ratio=0.0, reward_names=["accuracy"])
    assert len(train) == 6 and not val
    assert {k for row in train for k in row} == {"prompt", "solution", "level"}
    assert train[0]["prompt"][-1]["content"].endswith(rewards.ANSWER_INSTRUCTION["en"])
    math, _ = grpo_train_val_rows(["math-word-problems-en#5"], [], seed=1, test_ratio=0.0, reward_names=["format"])
    assert all(json.dumps(row["solution"]) and row["solution"] for row in math)


@pytest.mark.parametrize("prompt", [{"query": "What is 2 + 3?"}, {"instruction": "What is 2 + 3?"},
                                    {"messages": [{"role": "user", "content": "What is 2 + 3?"}]}])
def test_a_prompt_row_needs_no_reply(tmp_path, prompt):
    from martlet.train.grpo_data import grpo_train_val_rows

    data = write_jsonl(tmp_path / "p.jsonl", [{**prompt, "solution": "5"}] * 3)
    train, _ = grpo_train_val_rows([data], [], seed=1, test_ratio=0.0, reward_names=["my_reward"])
    assert train == [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "solution": "5"}] * 3


def test_use_vllm_asks_trl_for_colocated_generation_and_is_refused_without_a_gpu(tiny_llama, tmp_path):
    """The CPU sibling of scripts/gpu_check.sh's grpo_vllm_colocate: the GRPOConfig trl gets, and the refusal."""
    args = RLHFArguments(rlhf_type="grpo", dataset=["x"], reward_funcs=["accuracy"], num_generations=4,
                         batch_size=4, use_vllm=True, vllm_gpu_memory_utilization=0.25).validate()
    config = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                            **grpo_config_kwargs(args))
    assert (config.use_vllm, config.vllm_mode, config.vllm_gpu_memory_utilization) == (True, "colocate", 0.25)
    assert not grpo_config_kwargs(RLHFArguments(rlhf_type="grpo", dataset=["x"], reward_funcs=["accuracy"],
                                                num_generations=4, batch_size=4).validate())["use_vllm"]
    with pytest.raises(MartletError) as err:
        rlhf_main(RLHFArguments(rlhf_type="grpo", model_id_or_path=tiny_llama, dataset=["math-word-problems-en#8"],
                                reward_funcs=["accuracy"], num_generations=4, batch_size=4, max_steps=1,
                                use_vllm=True, report_to=["none"], output_dir=str(tmp_path / "out")))
    assert err.value.field == "use_vllm" and "GPU" in err.value.message

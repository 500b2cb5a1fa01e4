"""`martlet grpo` and `martlet rlhf --rlhf_type rm` end to end on a tiny llama: a run killed with SIGKILL resumes
at the step after its checkpoint; a reward model trains, scores replies and serves as a GRPO reward."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import register_length_reward, run_dirs, write_jsonl
from martlet.llm import RewardModel, RLHFArguments, rlhf_main

PAIRS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
          "rejected_response": f"{a} plus {b} is {a + b + 1}."} for a in range(1, 5) for b in range(1, 4)]


def grpo_command(model_dir, out, *extra):
    return [sys.executable, "-m", "martlet", "grpo", "--model_id_or_path", model_dir, "--dataset",
            "math-word-problems-en#40", "--reward_funcs", "format", "accuracy", "--output_dir", str(out),
            "--max_steps", "5", "--save_steps", "2", "--batch_size", "4", "--gradient_accumulation_steps", "1",
            "--num_generations", "4", "--max_completion_length", "6", "--logging_steps", "1",
            "--log_completions_steps", "1", "--lora_target_modules", "ALL", "--report_to", "none",
            "--disable_tqdm", "true", "--gradient_checkpointing", "false", "--beta", "0.04", *extra]


def test_a_killed_grpo_run_resumes_at_the_next_step(tiny_llama, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MARTLET_CPU_BF16": "0"}
    out = tmp_path / "out"
    proc = subprocess.Popen(grpo_command(tiny_llama, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and [r for r in run_dirs(str(out)) if os.path.isdir(os.path.join(r, "checkpoint-2"))]:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (run,) = run_dirs(str(out))
    # killed mid-run: after checkpoint-2, or already past checkpoint-4 on a fast host (a tiny model's steps take
    # ~0.1 s), before the end either way; the resumed run logs each step after its checkpoint once
    assert not os.path.isdir(os.path.join(run, "checkpoint-5"))

    done = subprocess.run(grpo_command(tiny_llama, out, "--resume_from_checkpoint", "true"), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout + done.stderr
    logs = [json.loads(line) for line in open(os.path.join(run, "logging.jsonl"))]
    steps = [r["step"] for r in logs if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # 3.. logged once, by the resumed part
    for key in ("rewards/format/mean", "rewards/format/std", "rewards/accuracy/mean", "frac_reward_zero_std",
                "completions/mean_length", "kl", "clip_ratio/region_mean"):
        assert all(key in r for r in logs if "loss" in r), key
    completions = [json.loads(line) for line in open(os.path.join(run, "completions.jsonl"))]
    assert sorted({c["step"] for c in completions}) == [1, 2, 3, 4, 5]
    assert all(len([c for c in completions if c["step"] == s]) == 4 for s in range(1, 6))  # no duplicate step
    assert set(completions[0]["rewards"]) == {"format", "accuracy"}
    assert os.path.isfile(os.path.join(run, "images", "rewards_format_mean.png"))
    assert os.path.isdir(os.path.join(run, "checkpoint-5"))


def test_a_reward_model_trains_scores_and_serves_as_a_grpo_reward(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = rlhf_main(RLHFArguments(rlhf_type="rm", model_id_or_path=tiny_llama, dataset=[data],
                                     output_dir=str(tmp_path / "rm"), max_steps=3, batch_size=2,
                                     gradient_accumulation_steps=1, logging_steps=1, learning_rate=5e-3,
                                     lora_target_modules=["ALL"], report_to=["none"], disable_tqdm=True,
                                     dataset_test_ratio=0.25, eval_steps=3, gradient_checkpointing=False))
    checkpoint = result["last_model_checkpoint"]
    assert os.path.isfile(os.path.join(checkpoint, "adapter_model.safetensors"))
    with open(os.path.join(checkpoint, "adapter_config.json")) as fh:
        assert "score" in json.load(fh)["modules_to_save"]
    assert any("eval_loss" in h for h in result["log_history"])
    conversations = [PAIRS[0]["messages"], PAIRS[0]["messages"][:1] + [{"role": "assistant", "content": "no"}]]
    scores = RewardModel(checkpoint).score(conversations)
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores) and scores[0] != scores[1]

    grpo = rlhf_main(RLHFArguments(rlhf_type="grpo", model_id_or_path=tiny_llama, dataset=["math-word-problems-en#8"],
                                   reward_model=[checkpoint], output_dir=str(tmp_path / "grpo"), max_steps=1,
                                   batch_size=4, gradient_accumulation_steps=1, num_generations=4,
                                   max_completion_length=4, logging_steps=1, beta=0.0, report_to=["none"],
                                   lora_target_modules=["ALL"], disable_tqdm=True, gradient_checkpointing=False))
    (logged,) = [h for h in grpo["log_history"] if "reward" in h]
    name = os.path.basename(checkpoint)
    assert f"rewards/{name}/mean" in logged and logged["reward_std"] > 0  # the model's scores differ per completion


def test_a_set_too_small_for_one_generation_batch_is_refused_before_training(tiny_llama, tmp_path):
    """7 prompts, a generation batch of 8 (2 a batch x 8 accumulation steps = 16 completions, 2 a prompt): trl's
    sampler yields whole batches only, so the run ended at step 0 as if it had trained."""
    from martlet.errors import MartletError

    with pytest.raises(MartletError, match="7 rows make no batch: one takes 8 different prompts") as caught:
        rlhf_main(RLHFArguments(rlhf_type="grpo", model_id_or_path=tiny_llama, dataset=["math-word-problems-small-en#8"],
                                reward_funcs=["accuracy"], num_generations=2, batch_size=2, gradient_accumulation_steps=8,
                                max_steps=2, max_completion_length=4, report_to=["none"], output_dir=str(tmp_path / "o")))
    assert caught.value.field == "dataset"


def test_full_parameter_grpo_with_a_kl_term_moves_every_weight_it_trains(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    result = rlhf_main(RLHFArguments(rlhf_type="grpo", model_id_or_path=tiny_llama, sft_type="full",
                                     dataset=["math-word-problems-small-en#8"], reward_funcs=[register_length_reward()],
                                     num_generations=4, batch_size=4, gradient_accumulation_steps=1, max_steps=2,
                                     max_completion_length=8, beta=0.04, learning_rate=1e-3, warmup_ratio=0.0,
                                     lr_scheduler_type="constant", logging_steps=1, temperature=1.0,
                                     gradient_checkpointing=False, report_to=["none"], disable_tqdm=True,
                                     output_dir=str(tmp_path / "out")))
    ckpt = result["last_model_checkpoint"]
    assert not os.path.exists(os.path.join(ckpt, "adapter_config.json"))
    before, after = load_file(os.path.join(tiny_llama, "model.safetensors")), load_file(
        os.path.join(ckpt, "model.safetensors"))
    moved = [k for k in before if k in after and not torch.equal(before[k].float(), after[k].float())]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and len(moved) >= len(before) // 2, moved
    logs = [h for h in result["log_history"] if "kl" in h]
    assert len(logs) == 2 and logs[0]["kl"] == 0 < logs[1]["kl"], logs  # the reference stays where training began
    assert logs[0]["grad_norm"] > 1e-3, logs  # the rewards differed within the group: a real gradient


def test_lora_grpo_scores_its_reference_on_the_fused_layers_and_the_kl_starts_at_zero(tiny_llama, tmp_path,
                                                                                       monkeypatch):
    """trl scores the reference through a 'ref' copy of the initial adapter, added after Martlet fused the LoRA
    layers: the fused layers run it (not peft's own path), and it is the starting policy (KL 0 at the first step,
    above 0 once the adapter moved)."""
    from martlet.train import kernels

    asked = []
    plain_lora = kernels._plain_lora
    monkeypatch.setattr(kernels, "_plain_lora", lambda layer, name: asked.append(name) or plain_lora(layer, name))
    result = rlhf_main(RLHFArguments(rlhf_type="grpo", model_id_or_path=tiny_llama,
                                     dataset=["math-word-problems-small-en#8"], reward_funcs=[register_length_reward()],
                                     num_generations=4, batch_size=4, gradient_accumulation_steps=1, max_steps=2,
                                     max_completion_length=8, beta=0.04, learning_rate=1e-2, warmup_ratio=0.0,
                                     lr_scheduler_type="constant", logging_steps=1, temperature=1.0,
                                     lora_target_modules=["ALL"], gradient_checkpointing=False, report_to=["none"],
                                     disable_tqdm=True, output_dir=str(tmp_path / "out")))
    assert "ref" in asked and "default" in asked, set(asked)
    logs = [h for h in result["log_history"] if "kl" in h]
    assert len(logs) == 2 and logs[0]["kl"] == 0 < logs[1]["kl"], logs

"""The training commands at this CPU's own defaults. The suite trains in fp32 (`MARTLET_CPU_BF16=0`, conftest: tiny
models train faster so), so here each command runs once with the dtype `--dtype AUTO` picks on the machine (bf16
with AVX512-BF16 or AMX: LoRA's bf16 base weights, full training's fp32 weights under bf16 autocast; fp32 elsewhere)
and the libraries' FutureWarnings as errors. Two faults only such runs showed: `martlet sft --sft_type full` stopped
at its first step on every bf16 CPU (the fused attention given fp32 q and k with bf16 v), and every DPO, KTO and GRPO
run printed three of transformers' deprecation warnings that trl's calls raise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import run_dirs, write_jsonl

PAIRS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
          "rejected_response": f"{a} plus {b} is {a + b + 1}."} for a in range(1, 4) for b in range(1, 4)]
GRPO = ("grpo", "--dataset", "math-word-problems-small-en#8", "--reward_funcs", "accuracy", "--num_generations", "2",
        "--max_completion_length", "4", "--gradient_accumulation_steps", "1")
COMMANDS = {"sft": ("sft",), "sft-full": ("sft", "--sft_type", "full"), "dpo": ("rlhf", "--rlhf_type", "dpo"),
            "dpo-full": ("rlhf", "--rlhf_type", "dpo", "--sft_type", "full"), "kto": ("rlhf", "--rlhf_type", "kto"),
            "grpo": GRPO}


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_a_training_command_runs_at_the_cpu_s_own_dtype(tmp_path, tiny_llama, name):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)  # (SFT reads the chosen replies)
    argv = [*COMMANDS[name], *(() if name == "grpo" else ("--dataset", data))]
    env = {k: v for k, v in os.environ.items() if k not in ("MARTLET_CPU_BF16", "PYTHONWARNINGS")}
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-m", "martlet", *argv, "--model_id_or_path",
                           tiny_llama, "--max_steps", "2", "--batch_size", "2", "--logging_steps", "1",
                           "--output_dir", "out", "--report_to", "none"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(str(tmp_path / "out"))
    with open(os.path.join(run, "logging.jsonl"), encoding="utf-8") as fh:
        losses = [row["loss"] for row in map(json.loads, fh) if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses

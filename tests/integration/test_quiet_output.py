"""A normal run prints no library warning: sft, infer, export, DPO and GRPO on the tiny model, and the Python API's
imports, as a user runs them, with stderr captured. Any line that looks like a warning fails the test unless it is on
the allow-list below, each entry with the reason it may appear (today it is empty: Martlet drops bitsandbytes' and
kernels' offline-kernel lines, utils.QUIET_LIBRARY_LINES, and the deprecated questions peft and trl ask transformers,
utils.libraries_quietly)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import write_jsonl

# (pattern, why it may appear)
ALLOWED: list[tuple[str, str]] = []
WARNING = re.compile(r"warn|deprecat|Failed to load|Skipping publisher", re.IGNORECASE)


def run(*argv: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "martlet", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if WARNING.search(line)
            and not any(re.search(pattern, line) for pattern, _ in ALLOWED)]


@pytest.mark.slow
def test_sft_infer_and_export_print_no_library_warning(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "data.jsonl", [{"query": f"q{i}", "response": f"a{i}"} for i in range(4)])
    sft = run("sft", "--model_id_or_path", tiny_llama, "--dataset", data, "--max_steps", "1", "--batch_size", "2",
              "--output_dir", "out", "--dataset_test_ratio", "0", "--report_to", "none", cwd=str(tmp_path))
    assert sft.returncode == 0, sft.stderr[-2000:]
    ckpt = next(str(p) for p in (tmp_path / "out").rglob("checkpoint-1") if p.is_dir())
    infer = run("infer", "--ckpt_dir", ckpt, "--val_dataset", data, "--max_new_tokens", "4", cwd=str(tmp_path))
    assert infer.returncode == 0, infer.stderr[-2000:]
    export = run("export", "--ckpt_dir", ckpt, "--merge_lora", "true", cwd=str(tmp_path))
    assert export.returncode == 0, export.stderr[-2000:]
    for name, proc in (("sft", sft), ("infer", infer), ("export", export)):
        assert noise(proc.stderr) == [], (name, proc.stderr[-3000:])
    merged = [line for line in export.stdout.splitlines() + export.stderr.splitlines() if "-merged" in line]
    assert len(merged) == 1, merged  # the result path, once


def test_the_python_api_imports_without_library_noise():
    """The spec's Python API (scripts/demo.py, a notebook) imports peft, which imports bitsandbytes, which tries to
    fetch a CPU kernel from a hub at import and logs two lines when it cannot (offline here)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONWARNINGS", None)
    code = "from martlet.llm import SftArguments, sft_main; import peft, bitsandbytes; print('imported')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr[-2000:]
    assert noise(proc.stderr) == [], proc.stderr[-3000:]


@pytest.mark.slow
def test_preference_training_grpo_and_qlora_print_no_library_warning(tmp_path, tiny_llama):
    """trl's reference forward (DPO, KTO) and its generation (GRPO), and peft's preparation of a 4-bit model (QLoRA),
    call transformers' deprecated gradient-checkpointing methods on the user's behalf: FutureWarnings, none the
    user's to act on."""
    pairs = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                           {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
              "rejected_response": f"{a} plus {b} is {a + b + 1}."} for a in range(1, 4) for b in range(1, 4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    common = ("--model_id_or_path", tiny_llama, "--max_steps", "2", "--batch_size", "2", "--report_to", "none")
    dpo = run("rlhf", "--rlhf_type", "dpo", "--dataset", data, "--eval_steps", "1", "--output_dir", "dpo", *common,
              cwd=str(tmp_path))
    grpo = run("grpo", "--dataset", "math-word-problems-small-en#8", "--reward_funcs", "accuracy",
               "--num_generations", "2", "--max_completion_length", "4", "--gradient_accumulation_steps", "1",
               "--output_dir", "grpo", *common, cwd=str(tmp_path))
    qlora = run("sft", "--quantization_bit", "4", "--gradient_checkpointing", "true", "--dataset", data, "--output_dir",
                "qlora", *common, cwd=str(tmp_path))
    for name, proc in (("dpo", dpo), ("grpo", grpo), ("qlora", qlora)):
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert noise(proc.stderr) == [], (name, proc.stderr[-3000:])

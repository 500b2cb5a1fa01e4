"""A normal run prints no library warning: sft, infer and export on the tiny model, as a user runs them, with
stderr captured. Any line that looks like a warning fails the test unless it is on the allow-list below, each
entry with the reason it may appear (today it is empty: Martlet drops bitsandbytes' and kernels' offline-kernel
lines, utils.QUIET_LIBRARY_LINES, and peft's deprecated question to transformers, utils.peft_quietly)."""

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

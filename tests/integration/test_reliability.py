"""A run killed at any moment resumes from its last whole checkpoint and ends where an uninterrupted run
ends; SIGTERM saves and stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from helpers import SPELL_ROWS, run_dirs, spell_argv, write_jsonl
from martlet.llm import sft_main


# `martlet sft` in a process that SIGKILLs itself mid-save at step N: the checkpoint's staging folder is written
# whole, and the process dies as it would rename it into place (the rename is `os.replace` of
# .tmp-checkpoint-N/checkpoint-N; the staged files' own writes replace other paths)
KILL_IN_SAVE = """
import os, signal, sys

from martlet.cli import main

STAGED = os.path.join(".tmp-checkpoint-{step}", "checkpoint-{step}")
rename = os.replace


def replace_or_die(src, dst, *args, **kwargs):
    if os.fspath(src).endswith(STAGED):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)


os.replace = replace_or_die
raise SystemExit(main(sys.argv[1:]))
"""


def start(args, kill_in_save_at=None, tmp_path=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "martlet"]
    if kill_in_save_at is not None:
        script = tmp_path / "kill_in_save.py"
        script.write_text(KILL_IN_SAVE.format(step=kill_in_save_at))
        command = [sys.executable, str(script)]
    return subprocess.Popen([*command, "sft", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_step(out, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        for run in run_dirs(out) if os.path.isdir(out) else []:
            log = os.path.join(run, "logging.jsonl")
            if os.path.isfile(log) and any(json.loads(line).get("step", 0) >= step for line in open(log)):
                return run
        time.sleep(0.2)
    raise AssertionError("training did not get there in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    """The uninterrupted run's final adapter."""
    tmp = tmp_path_factory.mktemp("reference")
    data = write_jsonl(tmp / "data.jsonl", SPELL_ROWS)
    result = sft_main(spell_argv(tiny_models["llama"], data, str(tmp / "out")))
    return data, load_file(os.path.join(result["last_model_checkpoint"], "adapter_model.safetensors"))


@pytest.mark.parametrize("where", ["during_step", "during_save"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_llama, reference, where):
    data, expected = reference
    out = str(tmp_path / "out")
    if where == "during_step":
        proc = start(spell_argv(tiny_llama, data, out))
        wait_for_step(out, 3, proc)  # checkpoint-2 exists, step 3 or 4 is running
        proc.send_signal(signal.SIGKILL)
    else:
        proc = start(spell_argv(tiny_llama, data, out), kill_in_save_at=4, tmp_path=tmp_path)
    proc.wait(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    (run,) = run_dirs(out)
    whole = sorted(d for d in os.listdir(run) if d.startswith("checkpoint-"))
    assert whole and all(os.path.isfile(os.path.join(run, d, "trainer_state.json")) for d in whole)
    if where == "during_save":
        assert whole == ["checkpoint-2"] and os.path.isdir(os.path.join(run, ".tmp-checkpoint-4"))

    resumed = subprocess.run([sys.executable, "-m", "martlet", "sft",
                              *spell_argv(tiny_llama, data, out, resume_from_checkpoint="true")],
                             env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = load_file(os.path.join(run, "checkpoint-6", "adapter_model.safetensors"))
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].allclose(expected[key], atol=1e-5), key
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "logging.jsonl"))
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step done twice or missed
    assert not any(d.startswith(".tmp-checkpoint") for d in os.listdir(run))


def test_sigterm_saves_and_says_how_to_resume(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "data.jsonl", SPELL_ROWS)
    out = str(tmp_path / "out")
    proc = start(spell_argv(tiny_llama, data, out, max_steps="500", save_steps="1000"))
    run = wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    saved = [d for d in os.listdir(run) if d.startswith("checkpoint-")]
    assert len(saved) == 1 and os.path.isfile(os.path.join(run, saved[0], "adapter_model.safetensors"))
    assert f"--resume_from_checkpoint {os.path.join(run, saved[0])}" in output


def test_output_dir_that_cannot_be_written_stops_before_any_work(tmp_path, tiny_llama):
    from martlet.errors import MartletError

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "response": "r"}] * 4)
    with pytest.raises(MartletError, match=r"a-file: field 'output_dir': is a file, not a folder"):
        sft_main(["--model_id_or_path", tiny_llama, "--dataset", data, "--output_dir", str(blocker / "out")])


def test_output_dir_without_room_for_a_checkpoint_stops_before_any_work(tmp_path, tiny_llama, monkeypatch):
    import collections
    import shutil

    from martlet.errors import MartletError

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "response": "r"}] * 4)
    out = tmp_path / "out"
    with pytest.raises(MartletError, match=r"field 'output_dir': only 0.00 GiB free, a checkpoint needs about"):
        sft_main(["--model_id_or_path", tiny_llama, "--dataset", data, "--output_dir", str(out), "--sft_type", "full"])
    assert not out.exists()

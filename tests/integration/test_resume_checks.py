"""Resume verifies what it loads (issue #25, round 2): a checkpoint is whole only with its weights, optimizer,
scheduler, RNG state and a readable trainer_state.json; `true` picks the newest whole one and names the ones it
skipped; a named one that is not whole is refused in one line; --resume_only_model loads the weights alone.
A second run refuses a folder holding another run; a resumed run reads on as one run (absolute paths, elapsed
time counting on, one summary line)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from helpers import SPELL_ROWS, spell_argv, write_jsonl
from martlet.errors import MartletError
from martlet.llm import SftArguments, sft_main

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")
DOC_SENTENCE = ("`--resume_from_checkpoint true` continues from the newest whole checkpoint under `--output_dir`, "
                "and names each newer one it skipped and why.")



def log_lines(run):
    with open(os.path.join(run, "logging.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_models):
    """A finished 6-step run with checkpoints 2, 4 and 6; each test breaks a copy of it."""
    tmp = tmp_path_factory.mktemp("trained")
    data = write_jsonl(tmp / "data.jsonl", SPELL_ROWS)
    result = sft_main(spell_argv(tiny_models["llama"], data, str(tmp / "out"), add_output_dir_suffix="false"))
    return data, result["output_dir"]


@pytest.fixture
def run_copy(tmp_path, trained):
    """(data, a copy of the trained run folder, with its files' times)."""
    data, run = trained
    copy = str(tmp_path / "out")
    shutil.copytree(run, copy)
    return data, copy


def test_docs_say_resume_true_picks_the_newest_whole_checkpoint(run_copy, tiny_llama, caplog):
    """docs/en/sft.md: DOC_SENTENCE; checked here: the newest checkpoint without its optimizer is skipped, named."""
    from martlet.train.run import resume_checkpoint

    with open(os.path.join(DOCS, "en", "sft.md"), encoding="utf-8") as fh:
        assert DOC_SENTENCE in fh.read()
    data, run = run_copy
    os.remove(os.path.join(run, "checkpoint-6", "optimizer.pt"))
    args = SftArguments(model_id_or_path=tiny_llama, dataset=[data], output_dir=run, resume_from_checkpoint="true")
    with caplog.at_level(logging.WARNING, logger="martlet"):
        assert resume_checkpoint(args) == os.path.join(run, "checkpoint-4")
    assert f"skipped {os.path.join(run, 'checkpoint-6')}: optimizer.pt is missing or empty" in caplog.text

    with open(os.path.join(run, "checkpoint-4", "trainer_state.json"), "w") as fh:
        fh.write('{"global_step": 4, "log_hist')  # cut short by a full disk
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="martlet"):
        assert resume_checkpoint(args) == os.path.join(run, "checkpoint-2")
    assert f"skipped {os.path.join(run, 'checkpoint-4')}: trainer_state.json does not parse" in caplog.text


@pytest.mark.parametrize("part", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                                  "adapter_model.safetensors"])
def test_a_named_checkpoint_that_is_not_whole_is_refused(run_copy, tiny_llama, part):
    data, run = run_copy
    checkpoint = os.path.join(run, "checkpoint-6")
    os.remove(os.path.join(checkpoint, part))
    argv = spell_argv(tiny_llama, data, run, add_output_dir_suffix="false", max_steps="8",
                   resume_from_checkpoint=checkpoint)
    with pytest.raises(MartletError) as caught:
        sft_main(argv)
    assert str(caught.value).startswith(f"{checkpoint}: field 'resume_from_checkpoint': not a whole checkpoint: "
                                        f"{part}")
    assert "--resume_only_model true" in str(caught.value)
    assert not os.path.exists(os.path.join(run, "checkpoint-8"))  # stopped before any work


def test_missing_weights_is_one_line_on_the_command_line(run_copy, tiny_llama):
    data, run = run_copy
    checkpoint = os.path.join(run, "checkpoint-6")
    os.remove(os.path.join(checkpoint, "adapter_model.safetensors"))
    argv = spell_argv(tiny_llama, data, run, max_steps="8", resume_from_checkpoint=checkpoint)
    done = subprocess.run([sys.executable, "-m", "martlet", "sft", *argv],
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"martlet: error: {checkpoint}: field 'resume_from_checkpoint': not a whole checkpoint: "
                      f"adapter_model.safetensors (or model*.safetensors) is missing or empty. Resume from a whole "
                      f"checkpoint, or pass --resume_only_model true to start a new run from its weights alone "
                      f"(fresh optimizer and learning-rate schedule)."], done.stderr[-2000:]


def test_resume_only_model_loads_the_weights_alone_into_a_new_run(tmp_path, trained, tiny_llama, caplog):
    data, run = trained
    broken = str(tmp_path / "broken")
    shutil.copytree(os.path.join(run, "checkpoint-6"), broken)
    os.remove(os.path.join(broken, "optimizer.pt"))
    os.remove(os.path.join(broken, "trainer_state.json"))
    out = str(tmp_path / "out")
    # a learning rate too small to move the weights: the new run ends where the checkpoint's weights are
    argv = spell_argv(tiny_llama, data, out, max_steps="2", learning_rate="1e-12", resume_from_checkpoint=broken,
                   resume_only_model="true")
    with caplog.at_level(logging.WARNING, logger="martlet"):
        result = sft_main(argv)
    assert f"--resume_only_model: loading only the weights of {broken}" in caplog.text
    assert "optimizer, learning-rate schedule" in caplog.text
    assert result["output_dir"].startswith(out) and result["global_step"] == 2
    assert [r["step"] for r in log_lines(result["output_dir"]) if "loss" in r] == [1, 2]  # a fresh step count
    expected = load_file(os.path.join(broken, "adapter_model.safetensors"))
    got = load_file(os.path.join(result["last_model_checkpoint"], "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in expected.items())
    assert set(got) == set(expected)
    assert all(got[k].allclose(expected[k], atol=1e-6) for k in expected)

    with pytest.raises(MartletError, match=r"field 'resume_only_model': needs --resume_from_checkpoint"):
        sft_main(spell_argv(tiny_llama, data, out, resume_only_model="true"))


def test_a_second_run_refuses_the_folder_of_another(tmp_path, tiny_llama, run_copy):
    data, run = run_copy
    before = sorted(os.listdir(run)), open(os.path.join(run, "logging.jsonl")).read()
    with pytest.raises(MartletError, match=r"field 'output_dir': already holds another run \(checkpoint-2, "
                                           r"checkpoint-4, checkpoint-6, images\)\. Resume it with "
                                           r"--resume_from_checkpoint true, .* or pass --overwrite_output_dir true"):
        sft_main(spell_argv(tiny_llama, data, run, add_output_dir_suffix="false"))
    assert (sorted(os.listdir(run)), open(os.path.join(run, "logging.jsonl")).read()) == before
    # resuming that run is not another run
    from martlet.train.run import check_run_folder

    check_run_folder(SftArguments(dataset=[data], output_dir=run, add_output_dir_suffix=False,
                                  resume_from_checkpoint="true"))

    result = sft_main(spell_argv(tiny_llama, data, run, add_output_dir_suffix="false", overwrite_output_dir="true",
                              max_steps="1"))
    assert result["output_dir"] == run
    assert sorted(d for d in os.listdir(run) if d.startswith("checkpoint-")) == ["checkpoint-1"]
    assert [r["step"] for r in log_lines(run) if "loss" in r] == [1]  # the first run's lines are gone
    assert sum("train_runtime" in r for r in log_lines(run)) == 1


def test_a_run_stopped_by_sigint_then_resumed_reads_as_one_run(tmp_path, tiny_llama, monkeypatch, caplog):
    data = write_jsonl(tmp_path / "data.jsonl", SPELL_ROWS)
    monkeypatch.chdir(tmp_path)
    argv = spell_argv(tiny_llama, data, "out", max_steps="500", save_steps="1000", eval_steps="1000",
                   disable_tqdm="true")
    proc = subprocess.Popen([sys.executable, "-m", "martlet", "sft", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
    logged = 0
    for line in proc.stdout:  # the Trainer prints each step's log: interrupt once two are out
        logged += line.lstrip().startswith("{'loss'")
        if logged == 2:
            proc.send_signal(signal.SIGINT)
            break
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-2000:]
    (model_dir,) = os.listdir("out")
    (run_name,) = os.listdir(os.path.join("out", model_dir))
    run = os.path.join(str(tmp_path), "out", model_dir, run_name)
    (stopped,) = [d for d in os.listdir(run) if d.startswith("checkpoint-")]
    step = int(stopped.split("-")[1])
    assert sum("train_runtime" in r for r in log_lines(run)) == 1

    with caplog.at_level(logging.INFO, logger="martlet"):
        result = sft_main(spell_argv(tiny_llama, data, "out", max_steps=str(step + 2), save_steps="1000",
                                  eval_steps="1000", resume_from_checkpoint="true"))
    # paths as absolute as a fresh run's
    assert result["output_dir"] == run
    assert result["last_model_checkpoint"] == os.path.join(run, f"checkpoint-{step + 2}")
    assert result["best_model_checkpoint"] == os.path.join(run, f"checkpoint-{step + 2}")
    assert f"run folder: {run}\n" in caplog.text and f"last_model_checkpoint: {run}" in caplog.text
    lines = log_lines(run)
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, step + 3))
    elapsed = [r["elapsed_s"] for r in lines]
    assert elapsed == sorted(elapsed)  # the clock counts on from the checkpoint's time
    assert [("train_runtime" in r) for r in lines].count(True) == 1 and "train_runtime" in lines[-1]

"""The logic of `martlet web-ui` without a browser: the command a form stands for, the CLI's validation with
its messages, the data preview, runs found in an output folder, and what logs and logging.jsonl say."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import time

import pytest

from helpers import write_jsonl
from martlet.args.base import parse_cli, to_dict
from martlet.args.rlhf import DPOArguments, RLHFArguments
from martlet.args.sft import SftArguments
from martlet.errors import MartletError
from martlet.ui import webui_form as form
from martlet.ui import webui_runs as runs


# the form -> the command ----------------------------------------------------------------------------------
def test_defaults_are_the_clis():
    sft = form.defaults("sft")
    assert (sft["learning_rate"], sft["max_steps"], sft["lora_rank"], sft["lora_alpha"], sft["dataset"]) == \
        (None, -1, 8, 32, [])
    assert form.defaults("dpo")["rlhf_type"] == "dpo" and form.defaults("orpo")["rlhf_type"] == "orpo"
    assert set(form.HYPERPARAMETERS) <= set(sft)


def test_argv_holds_only_what_differs_from_the_defaults():
    values = {"model_id_or_path": "/models/tiny", "sft_type": "lora", "dataset": ["a b.jsonl", "general-instruct#20"],
              "learning_rate": 2e-5, "num_train_epochs": 1.0, "max_steps": 6, "batch_size": 1, "lora_rank": 8,
              "save_steps": None, "use_dora": True}
    argv = form.build_argv("sft", values, "--system 'Be brief.'")
    assert argv == ["--model_id_or_path", "/models/tiny", "--dataset", "a b.jsonl", "general-instruct#20",
                    "--learning_rate", "2e-05", "--max_steps", "6", "--use_dora", "true", "--system", "Be brief."]
    line = form.command_line("sft", argv)
    assert line.startswith("martlet sft --model_id_or_path /models/tiny --dataset 'a b.jsonl' 'general-instruct#20'")
    assert shlex.split(line)[2:] == argv  # what is shown is what runs
    args = parse_cli(SftArguments, argv)
    assert (args.learning_rate, args.max_steps, args.dataset, args.system) == \
        (2e-5, 6, ["a b.jsonl", "general-instruct#20"], "Be brief.")
    assert form.build_argv("sft", {"num_train_epochs": 3.0, "learning_rate": 1e-4}) == \
        ["--num_train_epochs", "3", "--learning_rate", "0.0001"]


def test_argv_errors_name_the_problem():
    with pytest.raises(MartletError, match="has no argument 'lora_rnak'"):
        form.build_argv("sft", {"lora_rnak": 4})
    with pytest.raises(MartletError, match="extra arguments"):
        form.build_argv("sft", {}, "--system 'unclosed")


def test_a_saved_run_gives_its_command_back():
    args = parse_cli(DPOArguments, ["--dataset", "/data/pairs.jsonl", "--beta", "0.2", "--max_steps", "5",
                                    "--lora_target_modules", "ALL", "--resume_from_checkpoint", "true"])
    saved = json.loads(json.dumps(to_dict(args)))  # as sft_args.json holds it
    command, argv = form.saved_command(saved, "dpo")
    assert command == "dpo" and "--resume_from_checkpoint" not in argv
    assert parse_cli(DPOArguments, argv) == dataclasses.replace(args, resume_from_checkpoint=None)
    simpo = to_dict(parse_cli(RLHFArguments, ["--rlhf_type", "simpo", "--dataset", "x.jsonl"]))
    assert form.saved_command(simpo, "simpo") == ("rlhf", ["--rlhf_type", "simpo", "--dataset", "x.jsonl"])


# validation, as the CLI does it -----------------------------------------------------------------------------
def test_check_reports_what_the_cli_would_refuse(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "2 + 2?", "response": "4"}])
    assert isinstance(form.check("sft", ["--dataset", data, "--max_steps", "3"]), SftArguments)
    cases = [
        (["--dataset", data, "--learning_rate", "0"], r"field 'learning_rate': must be greater than 0 \(got 0.0\)"),
        (["--dataset", "general-instrukt"], r"unknown dataset 'general-instrukt'.*Did you mean: general-instruct"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "dataset file not found"),
        (["--model_id_or_path", "/no/such/model", "--dataset", data], r"/no/such/model: field 'model_id_or_path': "
                                                                      "model folder not found"),
        (["--model_id_or_path", str(tmp_path), "--dataset", data], "not a model folder"),
        (["--model_id_or_path", "qwen-7b-chatt", "--dataset", data], "unknown model type 'qwen-7b-chatt'"),
        ([], "no training data"),
        (["--dataset", data, "--lora_rnak", "4"], "unknown argument 'lora_rnak'. Did you mean: lora_rank"),
    ]
    for argv, message in cases:
        with pytest.raises(MartletError, match=message):
            form.check("sft", argv)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "response": "r"}, {"foo": 1}])
    with pytest.raises(MartletError, match=r"bad.jsonl:2: .*unknown row format"):
        form.check("sft", ["--dataset", bad])
    with pytest.raises(MartletError, match="chosen and rejected"):
        form.check("dpo", ["--dataset", data])  # conversations are not preference pairs


def test_hub_data_and_models_are_left_to_the_run():
    assert form.on_hub("alpaca-en") and form.on_hub("someone/some-set#100")
    assert not form.on_hub("general-instruct") and not form.on_hub("./someone/file.jsonl")
    form.check("sft", ["--dataset", "alpaca-en", "--model_id_or_path", "Qwen/Qwen2-0.5B"])  # no download here


def test_a_dataset_registered_in_the_extra_arguments_works_in_the_page(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n', encoding="utf-8")
    info = tmp_path / "my_datasets.json"
    info.write_text(json.dumps({"page-qa": {"dataset_path": str(tmp_path / "qa.jsonl"),
                                            "columns": {"question": "query", "answer": "response"}}}))
    argv = form.build_argv("sft", {"dataset": ["page-qa"]}, extra=f"--custom_dataset_info {info}")
    assert argv == ["--dataset", "page-qa", "--custom_dataset_info", str(info)]  # the run gets it too
    assert form.check("sft", argv).dataset == ["page-qa"]
    header, cells = form.preview_table(form.preview_rows("sft", "page-qa"))
    assert cells[0][1] == "user: 2+2?\nassistant: 4"


# the preview ----------------------------------------------------------------------------------------------
def test_preview_shows_rows_as_martlet_reads_them(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}] * 7)
    header, cells = form.preview_table(form.preview_rows("sft", alpaca))
    assert header == ["where", "conversation"] and len(cells) == 5
    assert cells[0] == ["a.jsonl:1", "user: Add\n2 and 3\nassistant: 5"]
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    header, cells = form.preview_table(form.preview_rows("dpo", pairs))
    assert header == ["where", "prompt", "chosen", "rejected"] and cells == [["p.jsonl:1", "user: Hi", "Hello!",
                                                                                "Go away."]]
    assert form.preview_rows("sft", "alpaca-en") == []
    csv = tmp_path / "c.csv"
    csv.write_text("query,response\nHow are you?,Fine.\n", encoding="utf-8")
    assert form.preview_table(form.preview_rows("sft", str(csv)))[1] == [["c.csv:2", "user: How are you?\n"
                                                                                     "assistant: Fine."]]



def test_preview_marks_the_loss_spans_of_the_first_row(tmp_path, embedded_dir, tiny_models):
    """The page's preview returns the table, the notes and the first row as training encodes it, the assistant
    replies (and nothing else) in <mark>, the rest escaped."""
    from martlet.ui import webui

    rows = [{"messages": [{"role": "user", "content": "Is 2 < 3?"}, {"role": "assistant", "content": "Yes: 2 < 3."},
                          {"role": "user", "content": "And 4 > 5?"}, {"role": "assistant", "content": "No."}]}]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    base = form.defaults("sft")
    numbers = [base[name] for name in form.HYPERPARAMETERS]
    for model, eot in (("", "&lt;|im_end|&gt;"), (tiny_models["gemma"], "&lt;end_of_turn&gt;")):
        table, notes, page = webui.preview(str(tmp_path), "sft", "", model, "lora", [data], *numbers)
        assert table.values.tolist()[0][0] == "m.jsonl:1" and notes == ""
        marks = re.findall(r"<mark>(.*?)</mark>", page, flags=re.S)
        assert marks == [f"Yes: 2 &lt; 3.{eot}", f"No.{eot}"]
        assert "Is 2 &lt; 3?" in page and "<b" not in page.replace("<mark>", "").replace("</mark>", "")
    # no mask for preference rows, a note when the model's files are not on this machine
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    assert webui.preview(str(tmp_path), "dpo", "", "", "lora", [pairs], *numbers)[2] == ""
    page = webui.preview(str(tmp_path), "sft", "", "qwen2-7b-instruct", "lora", [data], *numbers)[2]
    assert "Loss mask not shown" in page and "<mark>" not in page


# runs on disk ---------------------------------------------------------------------------------------------
def fake_run(output_dir, name: str, records: list[dict], checkpoints=(), command="sft", model_type="llama"):
    run_dir = os.path.join(output_dir, model_type, name)
    os.makedirs(run_dir)
    args = parse_cli(SftArguments, ["--dataset", "/data/x.jsonl", "--max_steps", "6"])
    with open(os.path.join(run_dir, "sft_args.json"), "w") as fh:
        json.dump(to_dict(args), fh)
    with open(os.path.join(run_dir, "martlet_run.json"), "w") as fh:
        json.dump({"command": command, "model_type": model_type}, fh)
    with open(os.path.join(run_dir, "logging.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    for step in checkpoints:
        os.makedirs(os.path.join(run_dir, f"checkpoint-{step}"))
        open(os.path.join(run_dir, f"checkpoint-{step}", "trainer_state.json"), "w").close()
    return run_dir


def test_grpo_is_a_method_with_its_prompts_previewed(tmp_path):
    from martlet.ui import webui

    assert "grpo" in form.METHODS
    argv = form.build_argv("grpo", {"dataset": ["math-word-problems-en#4"], "max_steps": 3,
                                    "output_dir": str(tmp_path)}, "--num_generations 4 --reward_funcs format accuracy")
    args = form.check("grpo", argv)
    assert args.rlhf_type == "grpo" and args.num_generations == 4
    assert form.command_line("grpo", argv).startswith("martlet grpo --dataset 'math-word-problems-en#4' --max_steps 3")
    header, cells = form.preview_table(form.preview_rows("grpo", "math-word-problems-en#4", args))
    assert header == ["where", "prompt", "columns"] and len(cells) == 4
    # the prompt as training sends it (the answer instruction the rewards check), the solution the rewards read
    assert all(c[1].startswith("user: ") and c[1].endswith("'Answer: <number>'.") for c in cells)
    assert all(json.loads(c[2])["solution"] for c in cells)
    data = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "2+2?"}], "solution": "4",
                                                       "level": 1}])
    args = form.check("grpo", ["--dataset", data, "--reward_funcs", "accuracy"])
    assert form.preview_table(form.preview_rows("grpo", data, args))[1] == [
        ["q.jsonl", "user: 2+2?\nSolve it in one or two short lines, then write the final line as 'Answer: <number>'.",
         '{"solution": "4", "level": 1}']]
    choices = webui._dataset_choices("grpo")
    assert "math-word-problems-en" in choices and "pref-identity" not in choices and "self-cognition" not in choices


def test_grpo_logs_give_reward_curves(tmp_path):
    from martlet.ui import webui

    records = [{"step": 1, "max_steps": 2, "loss": 0.0, "reward": 0.5, "rewards/format/mean": 0.25,
                "rewards/format/std": 0.4, "rewards/accuracy/mean": 0.25},
               {"step": 2, "max_steps": 2, "loss": 0.1, "reward": 1.0, "rewards/format/mean": 0.75,
                "rewards/accuracy/mean": 0.25}]
    assert runs.reward_curve(records) == [(1, "total", 0.5), (1, "format", 0.25), (1, "accuracy", 0.25),
                                          (2, "total", 1.0), (2, "format", 0.75), (2, "accuracy", 0.25)]
    assert runs.reward_curve([{"step": 1, "loss": 2.0}]) == []
    frame = webui.reward_frame(records)
    assert list(frame.columns) == ["step", "reward function", "reward"] and len(frame) == 6
    assert webui.reward_frame([{"step": 1, "loss": 2.0}]) is None
    fake_run(str(tmp_path), "v0-1", records, command="grpo")
    shown = webui.watch(str(tmp_path), None, None, None)
    assert webui.WATCHED[5] == "reward_curve" and len(shown[5]) == 6  # the page's reward plot gets the frame


def test_runs_are_found_in_the_output_folder(tmp_path):
    out = str(tmp_path / "out")
    old = fake_run(out, "v0-20250101-100000", [{"step": 6, "max_steps": 6, "loss": 1.0}], checkpoints=(3, 6))
    new = fake_run(out, "v1-20250101-110000", [{"step": 2, "max_steps": 9, "loss": 2.0}], checkpoints=(2,))
    os.makedirs(os.path.join(old, "checkpoint-6-merged"))  # an export, not a checkpoint
    os.makedirs(os.path.join(old, "checkpoint-9"))  # no trainer_state.json: not whole
    os.makedirs(os.path.join(out, "llama", "images"))
    os.makedirs(os.path.join(out, runs.WEBUI_DIR, "jobs"))
    assert runs.find_runs(out) == [new, old]
    assert runs.checkpoints(old) == [os.path.join(old, "checkpoint-6"), os.path.join(old, "checkpoint-3")]
    saved, command = runs.run_arguments(old)
    assert saved["max_steps"] == 6 and command == "sft"
    assert form.saved_command(saved, command) == ("sft", ["--dataset", "/data/x.jsonl", "--max_steps", "6"])
    # a job of an earlier server that ran `old`: its log and exit status come with the run
    job_dir = os.path.join(out, runs.WEBUI_DIR, "jobs", "20250101-100000-000000")
    os.makedirs(job_dir)
    with open(os.path.join(job_dir, "job.json"), "w") as fh:
        json.dump({"command": "sft", "argv": ["--max_steps", "6"], "returncode": 130, "run_dir": old}, fh)
    found = runs.entries(out)
    assert [e.key for e in found] == [new, old]
    assert found[0].job is None and found[0].label(out) == "llama/v1-20250101-110000"
    assert found[1].job.status() == "stopped" and found[1].job.log == os.path.join(job_dir, "run.log")
    assert found[1].label(out) == "llama/v0-20250101-100000 · stopped"
    assert runs.entries(str(tmp_path / "nothing")) == []


def test_logging_jsonl_gives_progress_and_curve(tmp_path):
    records = [{"step": 1, "max_steps": 4, "loss": 3.5, "learning_rate": 1e-4},
               {"step": 2, "max_steps": 4, "loss": 3.0},
               {"step": 2, "max_steps": 4, "eval_loss": 3.2},
               {"step": 3, "max_steps": 4, "loss": "nan?"}]
    run_dir = fake_run(str(tmp_path), "v0-1", records)
    with open(os.path.join(run_dir, "logging.jsonl"), "a") as fh:
        fh.write('{"step": 4, "max_st')  # a line being written
    read = runs.read_records(run_dir)
    assert read == records
    assert runs.progress(read) == (3, 4) and runs.progress([]) == (0, None)
    assert runs.curve(read) == [(1, "loss", 3.5), (2, "loss", 3.0), (2, "eval_loss", 3.2)]
    assert runs.read_records(None) == [] and runs.read_records(str(tmp_path / "none")) == []


def test_logs_give_the_run_folder_and_their_tail(tmp_path):
    text = "[martlet INFO] model: llama\n[martlet INFO] run folder: /out/llama/v3-20250101-120000\n"
    assert runs.parse_run_dir(text) == "/out/llama/v3-20250101-120000"
    assert runs.parse_run_dir("loading...\n") is None
    log = tmp_path / "run.log"
    bar = " 10%|█ | 1/10\r 50%|█████ | 5/10\r\x1b[A"  # tqdm redraws its bar; \x1b[A moves the cursor up
    log.write_text("".join(f"line {i}\n" for i in range(100)) + bar, encoding="utf-8")
    shown = runs.tail(str(log), lines=3).splitlines()
    assert shown == ["line 98", "line 99", " 50%|█████ | 5/10"]
    assert runs.tail(None) == "" and runs.tail(str(tmp_path / "none")) == ""


def test_resume_adds_the_checkpoint_once():
    argv = ["--dataset", "x", "--resume_from_checkpoint", "/r/checkpoint-2", "--max_steps", "9"]
    assert runs.resume_argv(argv, "/r/checkpoint-5") == ["--dataset", "x", "--max_steps", "9",
                                                          "--resume_from_checkpoint", "/r/checkpoint-5"]
    assert runs.resume_argv(["--resume_from_checkpoint=true"], "/c") == ["--resume_from_checkpoint", "/c"]


def test_uploads_are_kept_once_under_the_output_folder(tmp_path):
    first = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "response": "r"}])
    kept = runs.keep_upload(str(tmp_path / "out"), first)
    assert kept.startswith(str(tmp_path / "out" / runs.WEBUI_DIR / "uploads")) and kept.endswith("/d.jsonl")
    assert open(kept).read() == open(first).read()
    assert runs.keep_upload(str(tmp_path / "out"), first) == kept
    other = write_jsonl(tmp_path / "d2.jsonl", [{"query": "q2", "response": "r"}])
    assert runs.keep_upload(str(tmp_path / "out"), other) != kept


# jobs: the CLI in a subprocess -------------------------------------------------------------------------------
def test_jobs_run_the_cli_and_record_their_exit(tmp_path):
    out = str(tmp_path / "out")
    ok = runs.start_job(out, "list-datasets", [])
    bad = runs.start_job(out, "web-ui", ["--server_port", "70000"])  # refused by validation: exit 2
    try:
        assert {ok.id, bad.id} <= set(runs.JOBS)
        for job in (ok, bad):
            job.process.wait(timeout=60)
        assert ok.status() == "finished" and "general-instruct" in open(ok.log).read()
        assert bad.status() == "failed (exit 2)"
        assert "field 'server_port': must be in [0, 65535]" in runs.tail(bad.log)
        assert [e.key for e in runs.entries(out)] == [bad.id, ok.id]  # newest first
        assert runs.entries(out)[0].label(out) == f"job {bad.id} (starting) · failed (exit 2)"
        deadline = time.time() + 10
        while json.load(open(os.path.join(bad.folder, "job.json"))).get("returncode") is None:
            assert time.time() < deadline
            time.sleep(0.05)
        info = json.load(open(os.path.join(bad.folder, "job.json")))
        assert info["returncode"] == 2 and info["command_line"] == "martlet web-ui --server_port 70000"
        assert not bad.stop()  # it is not running
    finally:
        for job in (ok, bad):
            runs.JOBS.pop(job.id, None)


def test_a_run_started_by_an_earlier_server_can_be_stopped(tmp_path):
    """After a restart the page finds the job on disk; while its process lives (and is still a Martlet run) Stop
    sends it SIGINT by pid; an ended or reused pid is never signalled."""
    import subprocess
    import sys

    out = str(tmp_path / "out")
    folder = os.path.join(out, "web-ui", "jobs", "20261129-120000-000000")
    os.makedirs(folder)
    # says "ready" once its handler is installed, then waits for the signal
    waits = ("import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(130)); print('ready', "
             "flush=True); time.sleep(60)")
    run = subprocess.Popen([sys.executable, "-c", waits, "martlet.cli", "sft"], stdout=subprocess.PIPE,
                           text=True)  # stands in for `martlet sft`
    other = subprocess.Popen([sys.executable, "-c", waits], stdout=subprocess.DEVNULL)  # not a Martlet run
    try:
        for pid in (run.pid, other.pid):
            info = {"command": "sft", "argv": [], "pid": pid}
            with open(os.path.join(folder, "job.json"), "w") as fh:
                json.dump(info, fh)
            (job,) = runs.jobs_on_disk(out)
            if pid == other.pid:
                assert job.status() == "exit status unknown" and not job.stop()
                continue
            assert run.stdout.readline() == "ready\n"  # its handler is installed
            assert job.status() == "running" and job.stop()
            assert run.wait(timeout=30) == 130
            (job,) = runs.jobs_on_disk(out)
            assert job.status() == "exit status unknown" and not job.stop()  # gone: nothing to signal
    finally:
        for proc in (run, other):
            proc.kill()
            proc.wait()


def test_web_ui_arguments():
    from martlet.args.serve import WebUIArguments

    args = parse_cli(WebUIArguments, ["--port", "7999", "--output_dir", "runs"]).validate()
    assert (args.server_name, args.server_port, args.output_dir) == ("127.0.0.1", 7999, "runs")
    with pytest.raises(MartletError, match="server_port"):
        parse_cli(WebUIArguments, ["--server_port", "-1"]).validate()

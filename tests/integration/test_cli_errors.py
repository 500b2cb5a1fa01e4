"""Each bad input ends in one clear line on stderr, exit status 2, and nothing in the output folder."""

import os
import subprocess
import sys

import pytest

from helpers import write_jsonl
from martlet.cli import main

GOOD = {"query": "hi", "response": "hello"}


def run_cli(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def out(tmp_path):
    return tmp_path / "output"


@pytest.mark.parametrize("case", ["unknown_model", "unknown_dataset", "missing_file", "empty", "malformed",
                                  "missing_field", "unknown_argument", "not_a_model_dir", "offline_hub_id",
                                  "bad_value", "zero_lr"])
def test_bad_input(capsys, tmp_path, out, tiny_llama, case):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 4)
    base = ["sft", "--model_id_or_path", tiny_llama, "--output_dir", str(out), "--dataset"]
    if case == "unknown_model":
        argv, expect = ["sft", "--model_type", "qwen-7b-chta", "--dataset", good, "--output_dir", str(out)], \
            ["unknown model type 'qwen-7b-chta'", "Did you mean: qwen-7b-chat"]
    elif case == "unknown_dataset":
        argv, expect = base + ["self-cognitoin"], ["unknown dataset 'self-cognitoin'", "Did you mean: self-cognition"]
    elif case == "missing_file":
        argv, expect = base + [str(tmp_path / "nope.jsonl")], ["nope.jsonl", "not found"]
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        argv, expect = base + [str(tmp_path / "empty.jsonl")], ["empty.jsonl", "empty"]
    elif case == "malformed":
        (tmp_path / "bad.jsonl").write_text('{"query": "a", "response": "b"}\n{"query": "a", \n')
        argv, expect = base + [str(tmp_path / "bad.jsonl")], ["bad.jsonl:2:", "malformed JSON"]
    elif case == "missing_field":
        write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD, {"instruction": "say hi"}])
        argv, expect = base + [str(tmp_path / "rows.jsonl")], ["rows.jsonl:3:", "field 'output'", "missing"]
    elif case == "unknown_argument":
        argv, expect = base + [good, "--lora_rnak", "8"], ["unknown argument 'lora_rnak'", "Did you mean: lora_rank"]
    elif case == "not_a_model_dir":
        argv, expect = ["sft", "--model_id_or_path", str(tmp_path), "--dataset", good, "--output_dir", str(out)], \
            ["no config.json"]
    elif case == "offline_hub_id":
        argv, expect = ["sft", "--model_id_or_path", "qwen/Qwen-7B-Chat", "--dataset", good, "--output_dir",
                        str(out), "--check_model_is_latest", "false"], ["Qwen-7B-Chat", "not in the local cache"]
    elif case == "bad_value":
        argv, expect = base + [good, "--lora_rank", "eight"], ["field 'lora_rank'", "invalid value 'eight'"]
    else:
        argv, expect = base + [good, "--learning_rate", "0"], ["field 'learning_rate'", "greater than 0"]
    code, err = run_cli(capsys, argv)
    assert code == 2
    assert err.startswith("martlet: error: ") and len(err.splitlines()) == 1, err
    for text in expect:
        assert text in err, (text, err)
    assert not out.exists()


def test_cli_prints_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "martlet", "sft", "--dataset", str(tmp_path / "x.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "x.jsonl" in proc.stderr


def test_help_lists_arguments_with_descriptions(capsys):
    assert main(["sft", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--lora_target_modules" in text and "every linear layer" in text and "--model, " not in text
    assert "--model_id_or_path, --model" in text


@pytest.mark.parametrize("argv", [["sft", "--help"], ["list-models"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(argv):
    """`martlet sft --help | head`: the pipe's reader is gone before anything is written; the command stops the
    Unix way (status 141, as SIGPIPE), with no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    proc = subprocess.run([sys.executable, "-m", "martlet", *argv], stdout=write, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""

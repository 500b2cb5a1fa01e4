"""TrainingArguments fields Martlet does not own reach the trainer (issue #24): the optimizer a run saves is
the one asked for, and the run's sft_args.json gives them back."""

import json
import os

import torch

from helpers import run_dirs, write_jsonl
from martlet.args import SftArguments, parse_cli
from martlet.cli import main

ROWS = [{"messages": [{"role": "user", "content": f"What is {a} plus 2?"},
                      {"role": "assistant", "content": f"{a} plus 2 is {a + 2}."}]} for a in range(8)]


def train(argv):
    assert main(["sft", *argv, "--max_steps", "2", "--batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--dataset_test_ratio", "0", "--save_total_limit", "none"]) == 0


def saved_optimizer(run):
    return torch.load(os.path.join(run, "checkpoint-2", "optimizer.pt"), weights_only=False)


def test_optimizer_fields_reach_the_trainer_and_the_saved_arguments(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    train(["--model", tiny_llama, "--dataset", data, "--output_dir", str(tmp_path / "a"), "--optim", "adafactor"])
    (run_a,) = run_dirs(str(tmp_path / "a"))
    group = saved_optimizer(run_a)["param_groups"][0]
    assert "relative_step" in group and "betas" not in group  # transformers' Adafactor, not AdamW
    saved = os.path.join(run_a, "sft_args.json")
    with open(saved, encoding="utf-8") as fh:
        assert json.load(fh)["training_args"] == {"optim": "adafactor"}
    assert parse_cli(SftArguments, ["--config", saved]).training_args == {"optim": "adafactor"}

    # the same run from its saved arguments, with another optimizer and beta2 on the command line
    train(["--config", saved, "--output_dir", str(tmp_path / "b"), "--optim", "adamw_torch", "--adam_beta2", "0.9"])
    (run_b,) = run_dirs(str(tmp_path / "b"))
    group = saved_optimizer(run_b)["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.9) and "relative_step" not in group
    with open(os.path.join(run_b, "sft_args.json"), encoding="utf-8") as fh:
        assert json.load(fh)["training_args"] == {"optim": "adamw_torch", "adam_beta2": 0.9}


def test_a_refused_value_is_one_line_before_anything_runs(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    out = tmp_path / "out"
    for argv, words in ((["--adam_beta2", "2"], "field 'adam_beta2'"),
                        (["--adam_betaa2", "0.9"], "Did you mean: adam_beta2")):
        code = main(["sft", "--model", tiny_llama, "--dataset", data, "--output_dir", str(out), *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not out.exists()

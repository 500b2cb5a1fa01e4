"""Numbers outside their declared range, a flag given twice and several unknown config keys are errors that
name the field (issue #25, items 6, 9d and 9e)."""

import dataclasses
import importlib

import pytest

from martlet.args.base import field_kind, format_help, parse_cli
from martlet.args.export import ExportArguments
from martlet.args.serve import DeployArguments
from martlet.args.sft import SftArguments
from martlet.cli import COMMANDS, main
from martlet.errors import MartletError

OUT_OF_RANGE = [
    ("lora_dropout", "-0.5", "in [0, 1)"),
    ("lora_dropout", "2", "in [0, 1)"),
    ("lora_dropout", "1", "in [0, 1)"),  # drops every input: the adapter never sees data
    ("lora_alpha", "0", "greater than 0"),  # alpha / rank scales the update: 0 cannot learn
    ("warmup_ratio", "2", "in [0, 1]"),
    ("save_steps", "0", "at least 1"),
    ("save_total_limit", "0", "at least 1"),
    ("max_steps", "0", "at least 1, or -1"),  # transformers ran one step
    ("max_steps", "-2", "at least 1, or -1"),
    ("learning_rate", "nan", "greater than 0"),
    ("seed", "-1", "in [0, 4294967295]"),
]


@pytest.mark.parametrize("name, value, words", OUT_OF_RANGE)
def test_out_of_range_is_refused_on_the_command_line(capsys, tmp_path, name, value, words):
    out = tmp_path / "output"
    code = main(["sft", "--dataset", "x.jsonl", "--output_dir", str(out), f"--{name}", value])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("martlet: error: ") and len(err.splitlines()) == 1, err
    assert f"field '{name}'" in err and f"must be {words}" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("name, value, words", OUT_OF_RANGE)
def test_out_of_range_is_refused_by_validate(name, value, words):
    tp, _, _ = field_kind(SftArguments, name)
    args = SftArguments(dataset=["x"], **{name: tp(value)})  # the Python API skips parsing
    with pytest.raises(MartletError) as err:
        args.validate()
    assert err.value.field == name and f"must be {words}" in str(err.value)


def test_out_of_range_in_a_config_file_names_the_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: [x]\nlora_dropout: 1.5\n", encoding="utf-8")
    with pytest.raises(MartletError) as err:
        parse_cli(SftArguments, ["--config", str(cfg)])
    assert err.value.field == "lora_dropout" and str(cfg) in str(err.value)


def test_unset_sentinels_and_edges_stay_legal():
    args = parse_cli(SftArguments, ["--dataset", "x", "--max_steps", "-1", "--save_total_limit", "none",
                                    "--save_steps", "none", "--train_dataset_sample", "-1", "--lora_dropout", "0",
                                    "--warmup_ratio", "1"]).validate()
    assert (args.max_steps, args.save_total_limit, args.save_steps, args.train_dataset_sample) == (-1, None, None, -1)
    assert (args.lora_dropout, args.warmup_ratio) == (0.0, 1.0)
    assert parse_cli(SftArguments, ["--dataset", "x", "--max_steps", "1", "--num_train_epochs", "0"]).validate()
    assert parse_cli(ExportArguments, ["--quant_bits", "4", "--quant_group_size", "-1"]).quant_group_size == -1
    assert parse_cli(DeployArguments, ["--port", "0"]).validate().port == 0


def test_a_non_optional_number_cannot_be_unset():
    with pytest.raises(MartletError, match="needs a number") as err:
        parse_cli(SftArguments, ["--max_steps", "none"])
    assert err.value.field == "max_steps"


def _argument_classes():
    return sorted({importlib.import_module(t.partition(":")[0]).__dict__[t.partition(":")[2]]
                   for _, t, _, _ in COMMANDS.values() if t}, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _argument_classes(), ids=lambda c: c.__name__)
def test_every_number_declares_its_range_and_help_shows_it(cls):
    text = format_help(cls, "martlet x")
    for f in dataclasses.fields(cls):
        tp, _, _ = field_kind(cls, f.name)
        if tp not in (int, float) or f.metadata.get("choices"):
            continue
        rng = f.metadata.get("range")
        assert rng is not None, f"{cls.__name__}.{f.name} has no range"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        values = default if isinstance(default, list) else [default]  # a list's numbers: each in range
        assert all(v is None or v in rng for v in values), f"{cls.__name__}.{f.name}: default {default} out of range"
        assert f"Must be {rng}." in text.split(f"  --{f.name}", 1)[1].split("\n  --", 1)[0], f.name


def test_help_shows_the_range(capsys):
    assert main(["sft", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Dropout on the LoRA input. Must be in [0, 1)." in text
    assert "Must be at least 1, or -1." in text.split("--max_steps", 1)[1].split("\n  --", 1)[0]


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "1e-4", "--lr", "2e-4"], "--lr"),
    (["--lora_rank", "4", "--lora_rank", "8"], "--lora_rank"),
    (["--lr", "1e-4", "--learning_rate", "2e-4"], "--learning_rate"),
    (["--lora-rank", "4", "--lora_rank", "8"], "--lora_rank"),
    (["--dataset", "a", "--datasets", "b"], "--datasets"),
])
def test_a_flag_given_twice_is_an_error_naming_it(argv, flag):
    with pytest.raises(MartletError) as err:
        parse_cli(SftArguments, argv)
    assert flag in str(err.value) and "twice" in str(err.value)


def test_a_flag_given_twice_exits_2(capsys):
    assert main(["sft", "--dataset", "x", "--max_steps", "3", "--max_steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "--max_steps is given twice" in err and len(err.strip().splitlines()) == 1


def test_config_value_overridden_once_on_the_command_line_is_fine(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: [x]\nlr: 3.0e-4\nlora_rank: 16\n", encoding="utf-8")
    args = parse_cli(SftArguments, ["--config", str(cfg), "--learning_rate", "1e-4", "--lora_rank", "4"])
    assert (args.learning_rate, args.lora_rank) == (1e-4, 4)


def test_one_field_twice_in_a_config_file_names_the_file(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text('{"dataset": ["x"], "lr": 1e-4, "learning_rate": 2e-4}', encoding="utf-8")
    with pytest.raises(MartletError) as err:
        parse_cli(SftArguments, ["--config", str(cfg)])
    assert err.value.field == "learning_rate" and err.value.file == str(cfg) and "twice" in str(err.value)


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "dataset: [x]\nlearnin_rate: 1.0e-4\nlora_rnak: 8\nnum_train_epoch: 2\n"),
    (".json", '{"dataset": ["x"], "learnin_rate": 1e-4, "lora_rnak": 8, "num_train_epoch": 2}'),
])
def test_every_unknown_config_key_is_reported(tmp_path, suffix, text):
    cfg = tmp_path / f"run{suffix}"
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(MartletError) as err:
        parse_cli(SftArguments, ["--config", str(cfg)])
    message = str(err.value)
    assert err.value.file == str(cfg) and "3 unknown arguments" in message
    assert "'learnin_rate' (Did you mean: learning_rate" in message
    assert "'lora_rnak' (Did you mean: lora_rank" in message
    assert "'num_train_epoch' (Did you mean: num_train_epochs" in message
    assert len(message.splitlines()) == 1


def test_every_unknown_command_line_flag_is_reported():
    with pytest.raises(MartletError) as err:
        parse_cli(SftArguments, ["--lerning_rate", "1", "--lora_rnak", "2"])
    assert "'lerning_rate' (Did you mean: learning_rate" in str(err.value)
    assert "'lora_rnak' (Did you mean: lora_rank" in str(err.value)

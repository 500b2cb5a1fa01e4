"""The command line and config files become SftArguments; anything unknown is an error with a suggestion."""

import pytest

from martlet.args import SftArguments, format_help, parse_cli
from martlet.errors import MartletError


def test_names_aliases_and_types():
    args = parse_cli(SftArguments, ["--model", "m", "--train_type", "full", "--dataset", "a#2", "b.jsonl",
                                    "--gradient_checkpointing", "false", "--lr=2e-4", "--max_steps", "7",
                                    "--lora-target-modules", "ALL", "--use_dora"])
    assert (args.model_id_or_path, args.sft_type, args.dataset) == ("m", "full", ["a#2", "b.jsonl"])
    assert args.gradient_checkpointing is False and args.learning_rate == 2e-4 and args.max_steps == 7
    assert args.lora_target_modules == ["ALL"] and args.use_dora is True


def test_defaults_follow_the_spec():
    from types import SimpleNamespace

    from martlet.train.model_setup import uses_gradient_checkpointing

    args = SftArguments(dataset=["x"])
    assert args.sft_type == "lora" and args.dtype == "AUTO"
    # gradient checkpointing: on by default as in the spec, except on a CPU when the activations are small
    smollm2 = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    qwen_7b = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    assert args.gradient_checkpointing is None
    assert uses_gradient_checkpointing(args, "cuda", smollm2) is True
    assert uses_gradient_checkpointing(args, "cpu", qwen_7b) is True
    assert uses_gradient_checkpointing(args, "cpu", smollm2) is False
    assert uses_gradient_checkpointing(SftArguments(dataset=["x"], gradient_checkpointing=True), "cpu", smollm2)
    assert args.effective_learning_rate() == 1e-4 and args.effective_grad_accum() == 16
    assert SftArguments(dataset=["x"], sft_type="full").effective_learning_rate() == 1e-5


@pytest.mark.parametrize("argv, words", [
    (["--lora_rnak", "8"], "Did you mean: lora_rank"),
    (["--dtype", "fp64"], "choose one of AUTO, bf16, fp16, fp32"),
    (["--max_steps", "many"], "field 'max_steps'"),
    (["--use_dora", "maybe"], "true or false"),
    (["stray"], "unexpected value 'stray'"),
])
def test_bad_command_lines(argv, words):
    with pytest.raises(MartletError, match=words):
        parse_cli(SftArguments, argv)


def test_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: [self-cognition#10]\nlearning_rate: 3.0e-4\nlora_rank: 16\n", encoding="utf-8")
    args = parse_cli(SftArguments, ["--config", str(cfg), "--lora_rank", "4"])
    assert args.dataset == ["self-cognition#10"] and args.learning_rate == 3e-4 and args.lora_rank == 4
    bad = tmp_path / "bad.json"
    bad.write_text('{"dataset": ["x"], "learnin_rate": 1}', encoding="utf-8")
    with pytest.raises(MartletError) as err:
        parse_cli(SftArguments, ["--config", str(bad)])
    assert err.value.file == str(bad) and "Did you mean: learning_rate" in str(err.value)


@pytest.mark.parametrize("kwargs, field", [
    ({}, "dataset"),
    ({"dataset": ["x"], "learning_rate": 0.0}, "learning_rate"),
    ({"dataset": ["x"], "dataset_test_ratio": 1.0}, "dataset_test_ratio"),
    ({"dataset": ["x"], "sft_type": "full", "quantization_bit": 4}, "quantization_bit"),
    ({"dataset": ["x"], "resume_from_checkpoint": "/nonexistent/checkpoint-3"}, "resume_from_checkpoint"),
])
def test_validate_names_the_field(kwargs, field):
    with pytest.raises(MartletError) as err:
        SftArguments(**kwargs).validate()
    assert err.value.field == field


def test_validate_changes_nothing():
    args = SftArguments(dataset=["x"])
    before = dict(vars(args))
    args.validate()
    assert vars(args) == before


def test_help_has_every_field_once():
    text = format_help(SftArguments, "martlet sft")
    import dataclasses

    for f in dataclasses.fields(SftArguments):
        assert text.count(f"  --{f.name} ") + text.count(f"  --{f.name},") == 1, f.name


def test_a_runs_saved_arguments_read_back_as_a_config(tmp_path):
    """sft_args.json holds null for an unset text field with choices (attn_impl): read back, it is unset again."""
    import json

    from martlet.args import to_dict

    saved = tmp_path / "sft_args.json"
    saved.write_text(json.dumps(to_dict(SftArguments(dataset=["x"], training_args={"optim": "sgd"}))))
    args = parse_cli(SftArguments, ["--config", str(saved), "--attn_impl", "null"])
    assert args == SftArguments(dataset=["x"], training_args={"optim": "sgd"})
    assert parse_cli(SftArguments, ["--config", str(saved), "--system", "none"]).system is None

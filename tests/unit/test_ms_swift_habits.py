"""ms-swift 3/4 habits that simply work (issue #24): --torch_dtype bfloat16, --target_modules all-linear,
--train_type, --adapters, and any TrainingArguments field Martlet does not own passed through to transformers
with transformers' own checks."""

from types import SimpleNamespace

import pytest

from martlet.args import SftArguments, parse_cli, to_dict
from martlet.args.export import ExportArguments
from martlet.args.infer import InferArguments
from martlet.args.serve import AppUIArguments, DeployArguments
from martlet.errors import MartletError
from martlet.train.training_args import training_kwargs
from martlet.ui.webui_form import saved_command


def sft(*argv):
    return parse_cli(SftArguments, ["--dataset", "x", *argv])


@pytest.mark.parametrize("value, dtype", [("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32"),
                                          ("bf16", "bf16"), ("auto", "AUTO")])
def test_torch_dtype_values_are_read_as_martlets(value, dtype):
    assert sft("--torch_dtype", value).dtype == dtype
    assert sft("--dtype", value).dtype == dtype


def test_dtype_and_torch_dtype_together_is_an_error_naming_both():
    with pytest.raises(MartletError) as err:
        sft("--dtype", "bf16", "--torch_dtype", "float16")
    assert "--dtype" in str(err.value) and "--torch_dtype" in str(err.value) and err.value.field == "dtype"


def test_target_modules_all_linear_and_train_type(tmp_path):
    args = sft("--target_modules", "all-linear", "--train_type", "lora")
    assert args.lora_target_modules == ["ALL"] and args.sft_type == "lora"
    assert sft("--train_type", "full").sft_type == "full"
    assert sft("--target_modules", "q_proj", "v_proj").lora_target_modules == ["q_proj", "v_proj"]
    config = tmp_path / "run.yaml"
    config.write_text("dataset: [x]\ntorch_dtype: bfloat16\ntarget_modules: all-linear\ntrain_type: full\n")
    args = parse_cli(SftArguments, ["--config", str(config)])
    assert (args.dtype, args.lora_target_modules, args.sft_type) == ("bf16", ["ALL"], "full")


@pytest.mark.parametrize("cls", [InferArguments, ExportArguments, AppUIArguments, DeployArguments])
def test_adapters_with_one_folder_is_ckpt_dir(cls, tmp_path):
    assert parse_cli(cls, ["--adapters", str(tmp_path)]).ckpt_dir == str(tmp_path)


@pytest.mark.parametrize("cls", [InferArguments, ExportArguments, AppUIArguments])
def test_several_adapters_where_martlet_loads_one_is_a_clear_error(cls, tmp_path):
    with pytest.raises(MartletError) as err:
        parse_cli(cls, ["--adapters", str(tmp_path), str(tmp_path)])
    assert err.value.field == "ckpt_dir" and "one checkpoint folder" in str(err.value)
    assert "martlet deploy --adapters name=path" in str(err.value)


def test_deploy_adapters_serve_several(tmp_path):
    args = parse_cli(DeployArguments, ["--adapters", str(tmp_path), f"a={tmp_path}", f"b={tmp_path}"]).validate()
    assert args.ckpt_dir == str(tmp_path) and args.lora_modules == [f"a={tmp_path}", f"b={tmp_path}"]
    assert [name for name, _ in args.lora_pairs()] == ["a", "b"]
    only_named = parse_cli(DeployArguments, ["--adapters", f"a={tmp_path}"])
    assert only_named.ckpt_dir is None and only_named.lora_modules == [f"a={tmp_path}"]
    with pytest.raises(MartletError, match="at most one folder without a name"):
        parse_cli(DeployArguments, ["--adapters", str(tmp_path), str(tmp_path)])
    with pytest.raises(MartletError, match="given twice, as --adapters and as --lora_modules"):
        parse_cli(DeployArguments, ["--adapters", f"a={tmp_path}", "--lora_modules", f"b={tmp_path}"])


def test_training_arguments_fields_pass_through_typed():
    args = sft("--optim", "adamw_torch_fused", "--adam_beta2", "0.95", "--lr_scheduler_type", "cosine_with_min_lr",
               "--lr_scheduler_kwargs", '{"min_lr": 1e-6}', "--dataloader_drop_last", "true",
               "--torch_empty_cache_steps", "5", "--label_names", "labels", "--max_grad_norm", "0.5").validate()
    assert args.training_args == {"optim": "adamw_torch_fused", "adam_beta2": 0.95,
                                  "lr_scheduler_kwargs": {"min_lr": 1e-6}, "dataloader_drop_last": True,
                                  "torch_empty_cache_steps": 5, "label_names": ["labels"]}
    assert args.max_grad_norm == 0.5 and args.lr_scheduler_type == "cosine_with_min_lr"  # Martlet's own


@pytest.mark.parametrize("argv, field, words", [
    (["--adam_beta2", "2"], "adam_beta2", "Invalid beta parameter"),
    (["--optim", "adamw_nope"], "optim", "not a valid OptimizerNames"),
    (["--lr_scheduler_kwargs", '{"min_lr": 1e-6}'], "lr_scheduler_kwargs", "min_lr"),  # cosine takes no min_lr
    (["--warmup_steps", "-3"], "warmup_steps", "warmup_steps >= 0"),
])
def test_a_value_transformers_refuses_is_one_line_naming_the_field(argv, field, words):
    with pytest.raises(MartletError) as err:
        sft(*argv).validate()
    assert err.value.field == field and words in str(err.value)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("argv, words", [
    (["--adam_betaa2", "0.9"], "Did you mean: adam_beta2"),
    (["--lora_rnak", "8"], "Did you mean: lora_rank"),
    (["--adam_beta2", "high"], "field 'adam_beta2': invalid value 'high'"),
    (["--bf16", "true"], "Martlet sets it from --dtype"),
    (["--optim", "sgd", "--training_args", '{"optim": "adafactor"}'], "given twice"),
])
def test_names_neither_martlets_nor_transformers_are_refused(argv, words):
    with pytest.raises(MartletError, match=words):
        sft(*argv)


def test_training_args_from_the_python_api_are_checked_too():
    with pytest.raises(MartletError, match="Martlet's own argument: give it as --learning_rate"):
        SftArguments(dataset=["x"], training_args={"learning_rate": 1.0}).validate()
    with pytest.raises(MartletError, match="Did you mean: adam_beta2"):
        SftArguments(dataset=["x"], training_args={"adam_betaa2": 0.9}).validate()
    args = SftArguments(dataset=["x"], training_args={"adam_beta2": 0.9})
    before = dict(vars(args))
    args.validate()
    assert vars(args) == before


def test_config_file_and_command_line_pass_through_values_merge(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: [x]\noptim: adafactor\nadam_beta1: 0.8\n")
    args = parse_cli(SftArguments, ["--config", str(config), "--adam_beta1", "0.85", "--adam_epsilon", "1e-6"])
    assert args.training_args == {"optim": "adafactor", "adam_beta1": 0.85, "adam_epsilon": 1e-6}
    config.write_text('dataset: [x]\ntraining_args: {"optim": "sgd"}\n')
    assert parse_cli(SftArguments, ["--config", str(config)]).training_args == {"optim": "sgd"}


def test_training_kwargs_carry_the_pass_through_values():
    args = sft("--adam_beta2", "0.9", "--warmup_steps", "3", "--optim", "adafactor")
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2))
    kwargs = training_kwargs(args, "/tmp/run", "fp32", "cpu", False, model)
    assert kwargs["adam_beta2"] == 0.9 and kwargs["optim"] == "adafactor"
    assert kwargs["warmup_steps"] == 3  # the user's, over Martlet's default from --warmup_ratio
    assert kwargs["learning_rate"] == args.effective_learning_rate() and kwargs["remove_unused_columns"] is False


def test_the_web_ui_repeats_a_run_with_its_pass_through_values():
    saved = to_dict(SftArguments(dataset=["x"], training_args={"optim": "sgd", "adam_beta2": 0.9}))
    command, argv = saved_command(saved, "sft")
    assert command == "sft" and parse_cli(SftArguments, argv).training_args == {"optim": "sgd", "adam_beta2": 0.9}

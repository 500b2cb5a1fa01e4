"""`martlet export` arguments: defaults derived without rewriting fields, refused combinations name the field."""

import pytest

from martlet.args.base import format_help, parse_cli
from martlet.args.export import ExportArguments
from martlet.errors import MartletError


def parse(*argv):
    return parse_cli(ExportArguments, list(argv))


@pytest.mark.parametrize("argv, method, gguf_type", [
    (["--quant_bits", "4"], "gguf", "q4_0"),
    (["--quant_bits", "8"], "gguf", "q8_0"),
    (["--to_ollama", "true"], "gguf", "f16"),
    (["--gguf_type", "bf16"], "gguf", "bf16"),
    (["--gguf_outtype", "q8_0", "--quant_bits", "8"], "gguf", "q8_0"),
    (["--quant_method", "bnb", "--quant_bits", "8"], "bnb", None),
    (["--merge_lora", "true", "--ckpt_dir", "."], None, None),
])
def test_derived_method_and_type(argv, method, gguf_type):
    args = parse(*argv).validate()
    assert args.effective_quant_method() == method
    if gguf_type:
        assert args.effective_gguf_type() == gguf_type
    assert args.quant_method == (method if "--quant_method" in argv else None)  # nothing rewritten


@pytest.mark.parametrize("argv, field", [
    (["--merge_lora", "true"], "merge_lora"),
    (["--ckpt_dir", "/no/such/dir", "--merge_lora", "true"], "ckpt_dir"),
    (["--quant_method", "gptq"], "quant_bits"),
    (["--quant_method", "awq", "--quant_bits", "8"], "quant_bits"),
    (["--quant_method", "bnb", "--quant_bits", "4", "--gguf_type", "f16"], "gguf_type"),
    (["--gguf_type", "f16", "--quant_bits", "4"], "gguf_type"),
    (["--quant_method", "gptq", "--quant_bits", "4", "--to_ollama", "true"], "to_ollama"),
    (["--push_to_hub", "true"], "push_to_hub"),
    (["--quant_bits", "4", "--quant_n_samples", "0"], "quant_n_samples"),
    (["--quant_bits", "4", "--quantization_bit", "4"], "quantization_bit"),
])
def test_refused_combinations_name_the_field(argv, field):
    with pytest.raises(MartletError) as err:
        parse(*argv).validate()
    assert err.value.field == field


def test_bad_values_are_refused_when_parsed():
    with pytest.raises(MartletError, match="choose one of 0, 4, 8"):
        parse("--quant_bits", "3")
    with pytest.raises(MartletError, match="choose one of f32, f16, bf16, q8_0, q4_0"):
        parse("--gguf_type", "q5_k")


def test_hub_default_follows_use_modelscope_hub(monkeypatch):
    args = parse("--push_to_hub", "true", "--hub_model_id", "me/m")
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    assert args.effective_hub() == "huggingface"
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    assert args.effective_hub() == "modelscope"
    assert parse("--hub", "huggingface").effective_hub() == "huggingface"


def test_help_describes_every_export_flag():
    text = format_help(ExportArguments, "martlet export")
    for flag in ("--ckpt_dir", "--merge_lora", "--quant_bits", "--quant_method", "--gguf_type", "--quant_n_samples",
                 "--quant_seqlen", "--to_ollama", "--push_to_hub", "--hub_model_id", "--hub_private_repo"):
        line = next(i for i, l in enumerate(text.splitlines()) if l.strip().startswith(flag))
        assert text.splitlines()[line + 1].strip(), flag

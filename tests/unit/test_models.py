"""Model registry, resolution of names/folders, dtype choice, and a cheap import."""

import json
import os
import subprocess
import sys

import pytest

from martlet.errors import MartletError
from martlet.llm import ModelType, get_default_template_type
from martlet.models.dtype import resolve_dtype
from martlet.models.embedded import CONVERSION
from martlet.models.loader import resolve_model
from martlet.models.registry import find_by_hub_id, get_model_info, register_model


def test_model_type_constants():
    assert ModelType.qwen_7b_chat == "qwen-7b-chat"
    assert ModelType.qwen2_5_7b_instruct == "qwen2.5-7b-instruct"
    assert ModelType.smollm2_135m_instruct == "smollm2-135m-instruct"
    with pytest.raises(AttributeError, match="Did you mean"):
        ModelType.qwen_7b_chta  # noqa: B018
    assert get_default_template_type(ModelType.llama3_8b_instruct) == "llama3"
    assert find_by_hub_id("qwen/Qwen-7B-Chat").model_type == "qwen-7b-chat"


def _fake_conversion(monkeypatch, tmp_path, during=None):
    """embedded_model_dir() into tmp_path with a conversion that writes two files (and runs `during` midway)."""
    from martlet.models import embedded

    monkeypatch.setenv("MARTLET_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "gguf_path", lambda: "unused.gguf")

    def convert(src, out_dir):
        with open(os.path.join(out_dir, "model.safetensors"), "w") as fh:
            fh.write("ours")
        if during:
            during()
        with open(os.path.join(out_dir, embedded._DONE), "w") as fh:
            fh.write(json.dumps({"conversion": CONVERSION}))

    monkeypatch.setattr(embedded, "_convert", convert)
    return embedded, os.path.join(str(tmp_path), "models", embedded.EMBEDDED_MODEL_TYPE)


def test_a_conversion_finished_by_another_process_is_kept(monkeypatch, tmp_path):
    target = os.path.join(str(tmp_path), "models", "smollm2-135m-instruct")

    def other_process_finishes():  # e.g. a second `martlet` command started at the same time
        os.makedirs(target)
        marker = json.dumps({"conversion": CONVERSION})  # a whole conversion of this Martlet's version
        for name, text in (("model.safetensors", "theirs"), ("martlet_converted.json", marker)):
            with open(os.path.join(target, name), "w") as fh:
                fh.write(text)

    embedded, expected = _fake_conversion(monkeypatch, tmp_path, during=other_process_finishes)
    assert embedded.embedded_model_dir() == expected == target
    with open(os.path.join(target, "model.safetensors")) as fh:
        assert fh.read() == "theirs"  # not deleted under the other process's feet
    assert os.listdir(os.path.dirname(target)) == ["smollm2-135m-instruct"]  # our copy is gone


def test_a_half_written_conversion_is_replaced(monkeypatch, tmp_path):
    embedded, target = _fake_conversion(monkeypatch, tmp_path)
    os.makedirs(target)
    with open(os.path.join(target, "model.safetensors"), "w") as fh:
        fh.write("killed midway")  # no marker
    assert embedded.embedded_model_dir() == target
    with open(os.path.join(target, "model.safetensors")) as fh:
        assert fh.read() == "ours"
    assert sorted(os.listdir(target)) == ["martlet_converted.json", "model.safetensors"]


def test_embedded_model_is_the_default(embedded_dir):
    spec = resolve_model()
    assert spec.model_type == "smollm2-135m-instruct" and spec.model_dir == embedded_dir
    assert os.path.isfile(os.path.join(embedded_dir, "model.safetensors"))
    assert resolve_model(model_id_or_path=embedded_dir).model_type == "smollm2-135m-instruct"


def test_local_folder_and_type(tiny_llama):
    assert resolve_model(model_id_or_path=tiny_llama).model_type == "llama"  # config's model_type
    spec = resolve_model("llama3-8b-instruct", tiny_llama)
    assert spec.model_type == "llama3-8b-instruct" and spec.template_type == "llama3"


def test_unknown_and_offline():
    with pytest.raises(MartletError, match="Did you mean"):
        get_model_info("qwen-7b-chta")
    with pytest.raises(MartletError, match="not in the local cache"):
        resolve_model(model_id_or_path="someone/not-downloaded-model", check_model_is_latest=False)


def test_register_model_at_run_time(tiny_llama):
    register_model("my-tiny-llama", "me/tiny-llama", template="chatml", exist_ok=True)
    assert resolve_model("my-tiny-llama", tiny_llama).template_type == "chatml"
    with pytest.raises(MartletError, match="already registered"):
        register_model("my-tiny-llama", "me/tiny-llama")


def test_remote_code_is_refused_unless_asked(tmp_path, tiny_llama):
    import shutil

    from martlet.models.loader import load_model

    folder = tmp_path / "remote"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MartletError, match="trust_remote_code"):
        load_model(resolve_model(model_id_or_path=str(folder)))


def test_dtype_auto(monkeypatch):
    from martlet.models import dtype

    dtype.cpu_has_bf16.cache_clear()
    monkeypatch.setenv("MARTLET_CPU_BF16", "1")
    assert resolve_dtype("AUTO", "cpu") == "bf16"
    dtype.cpu_has_bf16.cache_clear()
    monkeypatch.setenv("MARTLET_CPU_BF16", "0")
    assert resolve_dtype("AUTO", "cpu") == "fp32"
    dtype.cpu_has_bf16.cache_clear()
    assert resolve_dtype("fp32", "cpu") == "fp32"
    with pytest.raises(MartletError, match="needs a GPU"):
        resolve_dtype("fp16", "cpu")


def test_import_is_cheap():
    code = "import sys, martlet.cli, martlet.llm; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_get_model_tokenizer_refuses_an_unknown_keyword():
    from martlet.llm import get_model_tokenizer

    with pytest.raises(MartletError) as err:
        get_model_tokenizer("qwen-7b-chat", load_modle=False)  # misspelt: it used to be ignored and the model loaded
    assert "unknown keyword 'load_modle'" in str(err.value) and "Did you mean: load_model" in str(err.value)
    with pytest.raises(MartletError, match="unknown keyword 'device_map'.*model_kwargs"):
        get_model_tokenizer("qwen-7b-chat", device_map="auto")

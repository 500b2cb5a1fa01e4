"""InferArguments, the checkpoint plan (explicit arguments win), generation settings and stop words."""

import json
import os

import pytest

from martlet.args.base import parse_cli
from martlet.args.infer import InferArguments
from martlet.errors import MartletError
from martlet.infer.checkpoint import plan_inference, read_checkpoint
from martlet.infer.generation import GenConfig, StreamText, cut_at_stop, held_back


def fake_checkpoint(folder, *, adapter=True, run=None, sft_args=None, tokenizer=True):
    os.makedirs(folder, exist_ok=True)
    if adapter:
        with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
            json.dump({"base_model_name_or_path": "/nowhere/base", "peft_type": "LORA"}, fh)
    else:
        with open(os.path.join(folder, "config.json"), "w") as fh:
            json.dump({"model_type": "llama"}, fh)
    if tokenizer:
        open(os.path.join(folder, "tokenizer_config.json"), "w").write("{}")
    for name, data in (("martlet_run.json", run), ("sft_args.json", sft_args)):
        if data is not None:
            with open(os.path.join(folder, name), "w") as fh:
                json.dump(data, fh)
    return str(folder)


def test_cli_names_and_aliases_parse():
    args = parse_cli(InferArguments, ["--ckpt_dir", "x", "--load_dataset_config", "true", "--show_dataset_sample",
                                      "5", "--max_new_tokens", "7", "--stop_words", "END", "Observation:",
                                      "--temperature", "0", "--merge_lora_and_save", "true", "--batch_size", "3"])
    assert args.ckpt_dir == "x" and args.load_dataset_config is True
    assert args.val_dataset_sample == 5 and args.max_new_tokens == 7 and args.max_batch_size == 3
    assert args.stop_words == ["END", "Observation:"] and args.temperature == 0.0 and args.merge_lora is True
    with pytest.raises(MartletError, match="Did you mean: max_new_tokens"):
        parse_cli(InferArguments, ["--max_new_token", "3"])


@pytest.mark.parametrize("kwargs, field", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
    ({"load_dataset_config": True}, "load_dataset_config"),
    ({"merge_lora": True}, "merge_lora"),
    ({"ckpt_dir": "/no/such/checkpoint"}, "ckpt_dir"),
])
def test_validate_names_the_field(kwargs, field):
    args = InferArguments(**kwargs)
    with pytest.raises(MartletError) as info:
        args.validate()
    assert info.value.field == field


def test_validate_changes_nothing(tmp_path):
    args = InferArguments(ckpt_dir=str(tmp_path), load_dataset_config=True)
    before = dict(vars(args))
    args.validate()
    assert vars(args) == before


def test_plan_takes_model_template_and_system_from_the_checkpoint(tmp_path):
    run = {"model_type": "qwen-7b-chat", "model_dir": str(tmp_path), "template_type": "qwen",
           "system": "You are Martlet."}
    ckpt = fake_checkpoint(tmp_path / "checkpoint-10", run=run, sft_args={"model_id_or_path": None})
    plan = plan_inference(InferArguments(ckpt_dir=ckpt))
    assert plan.model_type == "qwen-7b-chat" and plan.model_id_or_path == str(tmp_path)
    assert plan.adapter_dir == ckpt and plan.tokenizer_dir == ckpt
    assert plan.template_type == "qwen" and plan.system == "You are Martlet."


def test_explicit_arguments_win_over_the_checkpoint(tmp_path):
    run = {"model_type": "qwen-7b-chat", "model_dir": str(tmp_path), "template_type": "qwen", "system": "saved"}
    ckpt = fake_checkpoint(tmp_path / "checkpoint-10", run=run)
    plan = plan_inference(InferArguments(ckpt_dir=ckpt, model_id_or_path="/elsewhere/base", template_type="chatml",
                                         system="mine", model_type="qwen-1.8b-chat"))
    assert (plan.model_id_or_path, plan.template_type, plan.system, plan.model_type) == (
        "/elsewhere/base", "chatml", "mine", "qwen-1.8b-chat")


def test_tokenizer_template_and_unregistered_model_type(tmp_path):
    run = {"model_type": "llama", "model_dir": "/moved/away", "template_type": "tokenizer", "system": None}
    ckpt = fake_checkpoint(tmp_path / "c", run=run, sft_args={"model_id_or_path": "org/base-model"})
    plan = plan_inference(InferArguments(ckpt_dir=ckpt))
    # 'llama' is a config type, not a registry entry; the folder is gone, so the hub id saved in sft_args
    assert plan.model_type is None and plan.model_id_or_path == "org/base-model"
    assert plan.template_type == "AUTO"  # the checkpoint's tokenizer carries the template used in training


def test_full_checkpoint_is_its_own_model(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "checkpoint-5-merged", adapter=False, run={"model_type": "smollm2-135m-instruct"})
    plan = plan_inference(InferArguments(ckpt_dir=ckpt, model_id_or_path="/ignored"))
    assert plan.model_id_or_path == ckpt and plan.adapter_dir is None
    assert plan.model_type == "smollm2-135m-instruct"


def test_adapter_without_base_is_an_error(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "c")
    os.remove(os.path.join(ckpt, "adapter_config.json"))
    with pytest.raises(MartletError, match="neither a LoRA adapter"):
        read_checkpoint(ckpt)
    fake_checkpoint(tmp_path / "d", run={})
    with pytest.raises(MartletError, match="which base model") as info:
        plan_inference(InferArguments(ckpt_dir=str(tmp_path / "d")))
    assert info.value.field == "model_id_or_path"


# generation settings -------------------------------------------------------------------------------------
def test_gen_config_falls_back_to_the_models_generation_config():
    from transformers import GenerationConfig

    base = GenerationConfig(max_new_tokens=77, do_sample=True, temperature=0.6, top_p=0.8, eos_token_id=2)
    hf = GenConfig(top_p=0.5).to_hf(base, eos_token_ids=[5], pad_token_id=0)
    assert (hf.max_new_tokens, hf.do_sample, hf.temperature, hf.top_p) == (77, True, 0.6, 0.5)
    assert hf.eos_token_id == [2, 5] and hf.pad_token_id == 0
    assert base.top_p == 0.8  # the model's own config is not changed
    greedy = GenConfig(temperature=0).to_hf(base, eos_token_ids=[], pad_token_id=None)
    assert greedy.do_sample is False and greedy.temperature is None and greedy.pad_token_id == 2
    plain = GenConfig().to_hf(GenerationConfig(), eos_token_ids=[1], pad_token_id=1)
    assert plain.max_new_tokens == 2048 and not plain.do_sample


def test_gen_config_from_arguments_and_dicts():
    config = GenConfig.from_args(InferArguments(max_new_tokens=9, top_k=3, stop_words=["X"]))
    assert (config.max_new_tokens, config.top_k, config.stop_words) == (9, 3, ["X"])
    assert GenConfig.from_any({"max_new_tokens": 4}, temperature=0.1).temperature == 0.1
    with pytest.raises(MartletError, match="max_tokens"):
        GenConfig.from_any(None, max_tokens=3)


def test_cut_and_hold_back_stop_words():
    assert cut_at_stop("Paris.<|im_end|>junk", ["<|im_end|>"]) == ("Paris.", True)
    assert cut_at_stop("a Observation: b END", ["END", "Observation:"]) == ("a ", True)
    assert cut_at_stop("no stop", ["END"]) == ("no stop", False)
    assert held_back("text <|im", ["<|im_end|>"]) == 4
    assert held_back("text", ["<|im_end|>"]) == 0
    assert held_back("half \ufffd", []) == 1


def test_stream_text_never_shows_a_stop_word(tokenizer):
    ids = tokenizer("The answer is 42. Observation: more text", add_special_tokens=False)["input_ids"]
    stream = StreamText(tokenizer, ["Observation:"])
    shown = ""
    for token in ids:
        delta = stream.add([token])
        shown += delta
        assert "Obs" not in shown.replace("Observation", "") and "Observation" not in shown
    shown += stream.finish()
    assert shown == "The answer is 42. " and stream.stopped


def test_stream_text_stops_at_a_stop_token_and_keeps_chinese_whole(tokenizer):
    text = "北京是中国的首都。"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] + [100, 101]
    stream = StreamText(tokenizer, [], stop_ids=[tokenizer.eos_token_id])
    deltas = [stream.add([t]) for t in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_vllm_engine_says_what_it_needs():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from martlet.infer.vllm_engine import VllmEngine

    with pytest.raises(MartletError, match="needs the vllm package") as info:
        VllmEngine("/some/model", template=None)
    assert info.value.field == "infer_backend"

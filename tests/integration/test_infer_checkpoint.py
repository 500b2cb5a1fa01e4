"""Inference on a real LoRA checkpoint of `martlet sft` (tiny llama, trained in-process): the adapter gives
the training-time logits, --load_dataset_config evaluates exactly the held-out rows, merging is exact."""

import json
import os

import pytest

from helpers import adapter_copy, write_jsonl
from martlet import cli
from martlet.args.infer import InferArguments

QUESTIONS = [f"Question {i}: what is {i} plus {i}?" + " Think carefully." * (i % 4) for i in range(20)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """(last checkpoint, the Trainer at the end of training, dataset file) of a 3-step LoRA run."""
    from martlet.llm import SftArguments, sft_main
    from martlet.train import sft as sft_module

    root = tmp_path_factory.mktemp("infer-ckpt")
    data = write_jsonl(root / "data.jsonl", [{"query": q, "response": f"It is {2 * i}."}
                                             for i, q in enumerate(QUESTIONS)])
    captured = {}
    build = sft_module.build_sft_trainer

    def capture(*args, **kwargs):
        captured["trainer"] = build(*args, **kwargs)
        return captured["trainer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft_module, "build_sft_trainer", capture)
        result = sft_main(SftArguments(model_id_or_path=tiny_llama, dataset=[data], max_steps=3, batch_size=2,
                                       gradient_accumulation_steps=1, output_dir=str(root / "out"),
                                       dataset_test_ratio=0.25, eval_steps=2, report_to=["none"], dtype="fp32",
                                       learning_rate=1e-2, lora_target_modules=["ALL"], disable_tqdm=True))
    return result["last_model_checkpoint"], captured["trainer"], data


def logits_of(model, input_ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_adapter_gives_the_training_time_logits(trained, tiny_llama):
    import torch

    from martlet.models.loader import load_model, resolve_model
    from martlet.tuners import Swift

    ckpt, trainer, _ = trained
    ids = torch.tensor([list(range(5, 40))])
    at_training = logits_of(trainer.model, ids)
    base = load_model(resolve_model(None, tiny_llama), dtype="fp32")
    base_logits = logits_of(base, ids)
    loaded = Swift.from_pretrained(base, ckpt, inference_mode=True)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.allclose(logits_of(loaded, ids), at_training, atol=1e-5)
    assert (base_logits - at_training).abs().max() > 1e-3  # the adapter changed the model


def run_rows(results):
    return [r["query"] for r in results]


def test_load_dataset_config_evaluates_exactly_the_held_out_rows(trained, tmp_path):
    from martlet.models.loader import load_tokenizer
    from martlet.templates import get_template

    ckpt, _, data = trained
    out = tmp_path / "results"
    result = __import__("martlet.llm", fromlist=["infer_main"]).infer_main(
        InferArguments(ckpt_dir=ckpt, load_dataset_config=True, max_new_tokens=4, dtype="fp32", verbose=False,
                       result_dir=str(out)))
    queries = run_rows(result["result"])
    with open(os.path.join(ckpt, "martlet_run.json")) as fh:
        recorded = json.load(fh)["data"]["val"]
    assert len(queries) == recorded["rows"] == 5 and len(set(queries)) == 5
    assert set(queries) <= set(QUESTIONS)
    # the training process counted the tokens of the rows it evaluated on: the same rows give the same count
    template = get_template("AUTO", load_tokenizer(ckpt))
    tokens = sum(len(template.encode([{"role": "user", "content": r["query"]},
                                      {"role": "assistant", "content": r["label"]}]).input_ids)
                 for r in result["result"])
    assert tokens == recorded["tokens"]
    # no training row: a different seed holds out other rows, and evaluating those gives other queries
    other = __import__("martlet.infer.evaluate", fromlist=["eval_rows"]).eval_rows(
        InferArguments(dataset=[data], dataset_test_ratio=0.25, dataset_seed=7), None)
    assert {r["messages"][0]["content"] for r in other} != set(queries)
    assert os.path.dirname(result["result_path"]) == str(out)


def test_cli_infer_writes_results_and_metrics_beside_the_checkpoint(trained, capsys):
    ckpt, _, _ = trained
    code = cli.main(["infer", "--ckpt_dir", ckpt, "--load_dataset_config", "true", "--max_new_tokens", "4",
                     "--dtype", "fp32", "--val_dataset_sample", "2", "--max_batch_size", "2"])
    assert code == 0
    folder = os.path.join(ckpt, "infer_result")
    results = sorted(f for f in os.listdir(folder) if f.endswith(".jsonl"))
    assert results
    with open(os.path.join(folder, results[-1]), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert len(rows) == 2 and set(rows[0]) == {"query", "response", "label", "history", "system"}
    with open(os.path.join(folder, results[-1][:-6] + "_metrics.json")) as fh:
        metrics = json.load(fh)
    assert metrics["rows"] == 2 and {"exact_match", "rouge-l", "bleu-4"} <= set(metrics)
    assert "[QUERY] Question" in capsys.readouterr().out


def test_merge_lora_is_exact_atomic_and_reused(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from martlet.llm import merge_lora
    from martlet.models.loader import load_model, resolve_model
    from martlet.tuners import Swift

    ckpt, trainer, _ = trained
    merged = merge_lora(InferArguments(ckpt_dir=ckpt), device_map="cpu")
    assert merged == ckpt + "-merged"
    names = set(os.listdir(merged))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json",
            "sft_args.json", "martlet_run.json"} <= names
    assert "adapter_config.json" not in names
    parent = os.path.dirname(ckpt)
    assert not [d for d in os.listdir(parent) if d.startswith(".")]  # no temporary folder left behind
    assert AutoTokenizer.from_pretrained(merged).chat_template == AutoTokenizer.from_pretrained(ckpt).chat_template

    ids = torch.tensor([list(range(5, 40))])
    plain = AutoModelForCausalLM.from_pretrained(merged)
    with open(os.path.join(ckpt, "martlet_run.json")) as fh:
        base_dir = json.load(fh)["model_dir"]
    adapter = Swift.from_pretrained(load_model(resolve_model(None, base_dir), dtype="fp32"), ckpt)
    assert torch.allclose(logits_of(plain, ids), logits_of(adapter, ids), atol=1e-4)

    stamp = os.path.getmtime(os.path.join(merged, "model.safetensors"))
    assert merge_lora(InferArguments(ckpt_dir=ckpt)) == merged
    assert os.path.getmtime(os.path.join(merged, "model.safetensors")) == stamp  # reused, not merged again
    merge_lora(InferArguments(ckpt_dir=ckpt), replace_if_exists=True)
    assert os.path.getmtime(os.path.join(merged, "model.safetensors")) != stamp


def test_merged_folder_infers_like_the_adapter(trained, tmp_path):
    """An adapter with noisy B matrices (the trained one leaves the tiny model's replies as they were): its
    replies differ from the base model's (the same checkpoint with B = 0), and its merged folder's equal them."""
    from martlet.llm import infer_main

    ckpt, _, _ = trained
    noisy = adapter_copy(ckpt, str(tmp_path / "noisy" / "checkpoint-3"), b_std=0.5)
    base = adapter_copy(ckpt, str(tmp_path / "base" / "checkpoint-3"), b_std=0.0)
    common = dict(load_dataset_config=True, max_new_tokens=6, dtype="fp32", verbose=False)
    adapter = infer_main(InferArguments(ckpt_dir=noisy, result_dir=str(tmp_path / "a"), **common))
    merged = infer_main(InferArguments(ckpt_dir=noisy, merge_lora=True, result_dir=str(tmp_path / "m"), **common))
    plain = infer_main(InferArguments(ckpt_dir=base, result_dir=str(tmp_path / "b"), **common))
    assert os.path.isdir(noisy + "-merged")
    responses = [r["response"] for r in adapter["result"]]
    assert run_rows(merged["result"]) == run_rows(adapter["result"]) == run_rows(plain["result"])
    assert all(a != b for a, b in zip(responses, [r["response"] for r in plain["result"]])), responses
    assert [r["response"] for r in merged["result"]] == responses


def test_cli_errors_name_the_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["infer", "--ckpt_dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "neither a LoRA adapter" in err and "ckpt_dir" in err and str(tmp_path / "empty") in err
    assert cli.main(["infer", "--load_dataset_config", "true"]) == 2
    assert "needs --ckpt_dir" in capsys.readouterr().err

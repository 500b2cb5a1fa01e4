"""`martlet rlhf` end to end on a tiny llama: each method runs a few steps and writes SFT's run layout, the
preference metrics and curves, and checkpoints that `martlet infer` and merging read as they are."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import adapter_copy, run_dirs, write_jsonl
from martlet.llm import RLHFArguments, rlhf_main

PAIRS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
          "rejected_response": f"{a} plus {b} is {a + b + 1}."} for a in range(1, 5) for b in range(1, 4)]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def small_args(model_dir, data, out, **kw):
    base = dict(model_id_or_path=model_dir, dataset=[data], output_dir=str(out), max_steps=3, batch_size=2,
                gradient_accumulation_steps=1, eval_steps=2, logging_steps=1, dataset_test_ratio=0.25,
                learning_rate=5e-3, save_total_limit=None, lora_target_modules=["ALL"], report_to=["none"],
                disable_tqdm=True, gradient_checkpointing=False)
    base.update(kw)
    return RLHFArguments(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", PAIRS)


@pytest.mark.parametrize("kind", ["dpo", "orpo", "simpo", "cpo", "kto"])
def test_each_method_writes_the_run_layout_and_metrics(tmp_path, tiny_llama, data, kind):
    result = rlhf_main(small_args(tiny_llama, data, tmp_path / "out", rlhf_type=kind))

    (run,) = run_dirs(str(tmp_path / "out"))
    assert result["output_dir"] == run and result["global_step"] == 3
    with open(os.path.join(run, "martlet_run.json")) as fh:
        info = json.load(fh)
    rows_per_pair = 2 if kind == "kto" else 1  # a pair gives a desirable and an undesirable KTO row
    assert info["command"] == kind
    assert (info["data"]["train"]["kept"], info["data"]["val"]["kept"]) == (9 * rows_per_pair, 3 * rows_per_pair)
    if kind in ("dpo", "kto"):
        assert info["reference"] == "the model with its LoRA adapter switched off"
    with open(os.path.join(run, "sft_args.json")) as fh:
        assert json.load(fh)["rlhf_type"] == kind

    checkpoints = sorted(d for d in os.listdir(run) if d.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-3"] and result["last_model_checkpoint"].endswith("-3")
    last = result["last_model_checkpoint"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "sft_args.json", "martlet_run.json"):
        assert os.path.isfile(os.path.join(last, name)), name
    assert not os.path.exists(os.path.join(last, "ref"))  # no reference adapter copy
    assert not [d for d in os.listdir(run) if d.startswith(".")]  # whole checkpoints only, no staging left
    weights = load_file(os.path.join(last, "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())

    logs = [json.loads(line) for line in open(os.path.join(run, "logging.jsonl"))]
    train = [r for r in logs if "loss" in r]
    evals = [r for r in logs if "eval_loss" in r]
    assert len(train) == 3 and [r["step"] for r in evals] == [2, 3]
    metrics = METRICS + (["rewards/accuracies"] if kind != "kto" else [])  # KTO's rows are unpaired
    for key in metrics:
        assert all(key in r for r in train) and all(f"eval_{key}" in r for r in evals), key
        assert os.path.isfile(os.path.join(run, "images", key.replace("/", "_") + ".png")), key
    assert os.path.isfile(os.path.join(run, "images", "train_loss.png"))
    if kind != "kto":
        # logps are summed over the reply tokens: negative, and rewards follow the method's definition
        assert all(r["logps/chosen"] < 0 and r["logps/rejected"] < 0 for r in train)
        margins = [r["rewards/margins"] for r in train]
        assert all(abs(m - (r["rewards/chosen"] - r["rewards/rejected"])) < 1e-4 for m, r in zip(margins, train))


def test_dpo_checkpoint_works_with_infer_export_and_deploy(tmp_path, tiny_llama, data):
    from fastapi.testclient import TestClient

    from martlet.args.export import ExportArguments
    from martlet.args.infer import InferArguments
    from martlet.args.serve import DeployArguments
    from martlet.llm import export_main, infer_main
    from martlet.serve.main import create_deploy_app

    result = rlhf_main(small_args(tiny_llama, data, tmp_path / "out", max_steps=2, dataset_test_ratio=0,
                                  rpo_alpha=0.5))
    # the tiny model answers alike with or without two steps' adapter: noisy B matrices make the adapter
    # visible in the replies, and the same checkpoint with B = 0 gives the base model's
    ckpt = adapter_copy(result["last_model_checkpoint"], str(tmp_path / "noisy" / "checkpoint-2"), b_std=0.5)
    base = adapter_copy(result["last_model_checkpoint"], str(tmp_path / "base" / "checkpoint-2"), b_std=0.0)
    common = dict(max_new_tokens=4, dtype="fp32", verbose=False, do_sample=False, dataset=[data],
                  dataset_test_ratio=0.5, val_dataset_sample=2)  # evaluates the chosen replies as labels
    adapter = infer_main(InferArguments(ckpt_dir=ckpt, result_dir=str(tmp_path / "a"), **common))["result"]
    assert len(adapter) == 2
    without = infer_main(InferArguments(ckpt_dir=base, result_dir=str(tmp_path / "b"), **common))["result"]
    assert [r["query"] for r in without] == [r["query"] for r in adapter]
    assert all(a["response"] != b["response"] for a, b in zip(adapter, without)), (adapter, without)
    merged = export_main(ExportArguments(ckpt_dir=ckpt, merge_lora=True))["merged"]
    assert {"model.safetensors", "sft_args.json", "martlet_run.json"} <= set(os.listdir(merged))
    plain = infer_main(InferArguments(ckpt_dir=merged, result_dir=str(tmp_path / "m"), **common))["result"]
    assert [r["response"] for r in plain] == [r["response"] for r in adapter]

    app = create_deploy_app(DeployArguments(ckpt_dir=ckpt, dtype="fp32", served_model_name="dpo").validate())
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "dpo", "messages": [{"role": "user", "content": adapter[0]["query"]}], "max_tokens": 4,
            "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == adapter[0]["response"]


@pytest.mark.parametrize("precompute", [False, True])
def test_full_dpo_trains_all_weights_against_a_frozen_reference(tmp_path, tiny_llama, data, precompute):
    result = rlhf_main(small_args(tiny_llama, data, tmp_path / "out", sft_type="full", max_steps=2,
                                  learning_rate=1e-3, dataset_test_ratio=0, precompute_ref_log_probs=precompute))
    last = result["last_model_checkpoint"]
    with open(os.path.join(last, "martlet_run.json")) as fh:
        reference = json.load(fh)["reference"]
    assert reference == ("log-probs of the initial model, precomputed before training" if precompute
                         else "frozen model: a copy of the model being trained")
    after = load_file(os.path.join(last, "model.safetensors"))
    before = load_file(os.path.join(tiny_llama, "model.safetensors"))
    assert not before["model.layers.0.mlp.down_proj.weight"].equal(after["model.layers.0.mlp.down_proj.weight"])
    logs = [json.loads(line) for line in open(os.path.join(result["output_dir"], "logging.jsonl"))]
    first = next(r for r in logs if "loss" in r)
    # at step 1 the policy is the reference: rewards are zero and the loss is log 2 (whatever the reference is)
    assert abs(first["rewards/margins"]) < 1e-4 and abs(first["loss"] - 0.6931) < 1e-3


def test_cli_runs_dpo_and_reports_bad_data(tmp_path, tiny_llama, data, capsys):
    from martlet import cli

    common = ["--model_id_or_path", tiny_llama, "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
              "--dataset_test_ratio", "0", "--report_to", "none", "--disable_tqdm", "true"]
    assert cli.main(["dpo", "--dataset", data, *common]) == 0
    bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"query": "x", "response": "y"}])
    assert cli.main(["orpo", "--dataset", bad, *common]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'chosen'" in err and "Traceback" not in err


def test_resumed_dpo_run_ends_where_an_uninterrupted_one_does(tmp_path, tiny_llama, data):
    """The same reference (the adapter switched off) and data order after a resume: the same adapter."""
    kw = dict(max_steps=4, eval_steps=2, dataset_test_ratio=0.0)
    first = rlhf_main(small_args(tiny_llama, data, tmp_path / "out", **kw))
    uninterrupted = load_file(os.path.join(first["last_model_checkpoint"], "adapter_model.safetensors"))
    checkpoint = os.path.join(first["output_dir"], "checkpoint-2")
    resumed = rlhf_main(small_args(tiny_llama, data, tmp_path / "out", resume_from_checkpoint=checkpoint, **kw))
    assert resumed["output_dir"] == first["output_dir"] and resumed["global_step"] == 4  # the same run goes on
    logs = [json.loads(line) for line in open(os.path.join(resumed["output_dir"], "logging.jsonl"))]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3, 4]
    again = load_file(os.path.join(resumed["last_model_checkpoint"], "adapter_model.safetensors"))
    assert all(uninterrupted[k].allclose(again[k], atol=1e-5) for k in uninterrupted)


@pytest.fixture
def forward_calls(monkeypatch):
    """Whether autograd was on, for each padding-free preference forward (the reference's run without it)."""
    from martlet.train import rlhf_trainers

    calls = []
    original = rlhf_trainers._padding_free_forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rlhf_trainers, "_padding_free_forward", counted)
    return calls


def test_lora_dpo_precomputes_its_reference_padding_free(tmp_path, tiny_llama, data, forward_calls):
    calls = forward_calls
    result = rlhf_main(small_args(tiny_llama, data, tmp_path / "out", max_steps=2, dataset_test_ratio=0,
                                  precompute_ref_log_probs=True))
    with open(os.path.join(result["last_model_checkpoint"], "martlet_run.json")) as fh:
        assert json.load(fh)["reference"].endswith("precomputed")
    precompute = len(calls) - 2  # one padding-free forward a training step (the reference is not run again)
    assert precompute >= 1 and not any(calls[:precompute]) and all(calls[precompute:]), calls
    first = next(h for h in result["log_history"] if "loss" in h)
    # step 1: the policy is the reference (LoRA B = 0), so the precomputed log-probs equal the policy's own
    assert abs(first["rewards/margins"]) < 1e-4 and abs(first["loss"] - 0.6931) < 1e-3


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_the_second_epoch_runs_no_reference_forward_and_ends_where_recomputing_does(tmp_path, tiny_llama, data,
                                                                                      forward_calls, monkeypatch,
                                                                                      caplog, kind):
    """Two epochs of LoRA DPO / KTO: the reference's forwards run in the first epoch only (patch
    `trl_reference_cache`), and the adapter is the one of a run that computes the reference in every step."""
    from martlet import patches
    from martlet.train import rlhf_trainers

    monkeypatch.setattr(patches, "_verdicts", {})  # (the KTO guard below runs in this test)
    calls = forward_calls
    kw = dict(rlhf_type=kind, max_steps=-1, num_train_epochs=2, dataset_test_ratio=0, save_steps=100)
    # no-grad forwards a step: the reference's (DPO one row; KTO inline the replies and their KL rows, Martlet's both
    # stacked in one: patch `trl_kto_joint_reference`, whose guard first runs a batch both ways), KTO's policy KL rows
    inline, reference, policy, guard = (1, 1, 0, 0) if kind == "dpo" else (2, 1, 1, 3)
    with caplog.at_level(logging.INFO, logger="martlet"):
        cached = rlhf_main(small_args(tiny_llama, data, tmp_path / "cached", **kw))
    steps = cached["global_step"]
    said = f"reference log-probs: {steps} computed, {steps} read back"  # (each pair / KTO row: 2 a step)
    assert said in caplog.text
    assert steps == (12 if kind == "dpo" else 24)  # 12 pairs (KTO: 24 rows), 2 a step, 2 epochs
    assert calls.count(True) == steps and calls.count(False) == steps * policy + steps // 2 * reference + guard, calls
    calls.clear()
    monkeypatch.setattr(rlhf_trainers.ReferenceCache, "reads", lambda self, batch: False)
    recomputed = rlhf_main(small_args(tiny_llama, data, tmp_path / "recomputed", **kw))
    assert calls.count(True) == steps and calls.count(False) == steps * (policy + inline)
    a, b = (load_file(os.path.join(r["last_model_checkpoint"], "adapter_model.safetensors"))
            for r in (cached, recomputed))
    assert all(a[k].allclose(b[k], atol=1e-5) for k in a)

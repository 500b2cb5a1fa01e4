"""`martlet sft` end to end on tiny models of several architectures: the run layout and that it learns."""

import json
import os
import re

import pytest
from safetensors.torch import load_file

from helpers import ARCH_TEMPLATES, run_dirs, write_jsonl
from martlet.llm import SftArguments, sft_main

ROWS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
        for a in range(1, 7) for b in range(1, 4)]


def small_args(model_dir, data, out, **kw):
    base = dict(model_id_or_path=model_dir, dataset=[data], output_dir=str(out), max_steps=5, batch_size=2,
                gradient_accumulation_steps=1, eval_steps=2, logging_steps=1, dataset_test_ratio=0.2,
                learning_rate=5e-3, save_total_limit=None, lora_target_modules=["ALL"])
    base.update(kw)
    return SftArguments(**base)


@pytest.mark.parametrize("arch", sorted(ARCH_TEMPLATES))
def test_lora_sft_writes_the_run_layout(tmp_path, tiny_models, arch):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    result = sft_main(small_args(tiny_models[arch], data, tmp_path / "output"))

    (run,) = run_dirs(str(tmp_path / "output"))
    assert re.fullmatch(r"v0-\d{8}-\d{6}", os.path.basename(run))
    assert os.path.basename(os.path.dirname(run)) == arch  # model type of a local folder: its config's
    assert result["output_dir"] == run
    for name in ("sft_args.json", "martlet_run.json", "logging.jsonl", "images/train_loss.png",
                 "images/eval_loss.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    assert any(f.startswith("events.out.tfevents") for _, _, files in os.walk(os.path.join(run, "runs")) for f in files)

    checkpoints = sorted(d for d in os.listdir(run) if d.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    last = os.path.join(run, "checkpoint-5")
    assert result["last_model_checkpoint"] == last
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "sft_args.json", "martlet_run.json", "optimizer.pt"):
        assert os.path.isfile(os.path.join(last, name)), name
    with open(os.path.join(last, "sft_args.json")) as fh:
        assert json.load(fh)["model_id_or_path"] == tiny_models[arch]

    # LoRA B matrices start at zero: non-zero ones prove training changed the adapter
    weights = load_file(os.path.join(last, "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())

    logs = [json.loads(line) for line in open(os.path.join(run, "logging.jsonl"))]
    losses = [r["loss"] for r in logs if "loss" in r]
    evals = {r["step"]: r["eval_loss"] for r in logs if "eval_loss" in r}
    assert len(losses) == 5 and sorted(evals) == [2, 4, 5]
    assert losses[-1] < losses[0]
    best_step = min(evals, key=evals.get)
    assert result["best_model_checkpoint"] == os.path.join(run, f"checkpoint-{best_step}")


@pytest.mark.parametrize("dtype", ["AUTO", "bf16"])
def test_full_sft_changes_the_weights(tmp_path, tiny_llama, dtype):
    """bf16 on a CPU: fp32 weights under bf16 autocast, where the rotary angles (fp32) make q and k fp32 and v stays
    bf16: the attention takes them (it raised on the mixed dtypes, `martlet sft --sft_type full` on any bf16 CPU)."""
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    result = sft_main(small_args(tiny_llama, data, tmp_path / "out", sft_type="full", max_steps=2,
                                 learning_rate=1e-3, dataset_test_ratio=0.0, dtype=dtype))
    last = result["last_model_checkpoint"]
    assert result["best_model_checkpoint"] == last  # no validation set: the last one is the best
    after = load_file(os.path.join(last, "model.safetensors"))
    before = load_file(os.path.join(tiny_llama, "model.safetensors"))
    changed = [k for k in before if k in after and not before[k].equal(after[k])]
    assert "model.layers.0.mlp.down_proj.weight" in changed


def test_pt_trains_on_plain_text(tmp_path, tiny_llama):
    """Plain text has a label on every token, the first of each sample too: a padding-free row (the default)
    trains on the same tokens as a padded batch, so the first step's loss is the same (all 12 rows in it)."""
    from martlet.llm import PtArguments, pt_main

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"Line {i}: the quick brown fox."} for i in range(12)])
    first_losses = []
    for padding_free in (True, False):
        result = pt_main(PtArguments(model_id_or_path=tiny_llama, dataset=[data], output_dir=str(tmp_path / "o"),
                                     max_steps=2, batch_size=12, gradient_accumulation_steps=1, dataset_test_ratio=0,
                                     logging_steps=1, lora_dropout=0.0, padding_free=padding_free,
                                     report_to=["none"]))
        assert result["global_step"] == 2
        assert os.path.isfile(os.path.join(result["last_model_checkpoint"], "adapter_model.safetensors"))
        first_losses.append([h["loss"] for h in result["log_history"] if "loss" in h][0])
    padding_free_loss, padded_loss = first_losses
    # equal to fp32 rounding; trained on each sample's first token too, the row's loss is 1e-4 (rel.) off
    assert padding_free_loss == pytest.approx(padded_loss, rel=1e-5)


def test_resume_from_checkpoint_continues_the_run(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    kw = dict(max_steps=4, eval_steps=2, dataset_test_ratio=0.0, report_to=["none"], save_total_limit=None)
    first = sft_main(small_args(tiny_llama, data, tmp_path / "out", **kw))
    uninterrupted = load_file(os.path.join(first["last_model_checkpoint"], "adapter_model.safetensors"))
    checkpoint = os.path.join(first["output_dir"], "checkpoint-2")
    resumed = sft_main(small_args(tiny_llama, data, tmp_path / "out", resume_from_checkpoint=checkpoint, **kw))
    assert resumed["global_step"] == 4 and resumed["output_dir"] == first["output_dir"]  # the same run goes on
    logs = [json.loads(line) for line in open(os.path.join(resumed["output_dir"], "logging.jsonl"))]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3, 4]  # no step logged twice or missed
    again = load_file(os.path.join(resumed["last_model_checkpoint"], "adapter_model.safetensors"))
    assert all(uninterrupted[k].allclose(again[k], atol=1e-5) for k in uninterrupted)

    # resuming a finished run trains nothing (the Trainer alone would take a fifth step); a longer one goes on
    finished = sft_main(small_args(tiny_llama, data, tmp_path / "out", resume_from_checkpoint="true", **kw))
    assert finished["global_step"] == 4 and finished["last_model_checkpoint"] == resumed["last_model_checkpoint"]
    assert not os.path.exists(os.path.join(first["output_dir"], "checkpoint-5"))
    logs = [json.loads(line) for line in open(os.path.join(resumed["output_dir"], "logging.jsonl"))]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3, 4]
    longer = sft_main(small_args(tiny_llama, data, tmp_path / "out", resume_from_checkpoint="true",
                                 **{**kw, "max_steps": 6}))
    assert longer["global_step"] == 6 and os.path.isdir(os.path.join(first["output_dir"], "checkpoint-6"))


def test_resume_true_finds_the_newest_whole_checkpoint(tmp_path, tiny_llama):
    from martlet.train.run import resume_checkpoint

    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    first = sft_main(small_args(tiny_llama, data, tmp_path / "out", max_steps=2, eval_steps=1,
                                dataset_test_ratio=0.0, report_to=["none"], save_total_limit=None))
    run = first["output_dir"]
    assert sorted(d for d in os.listdir(run) if "checkpoint" in d) == ["checkpoint-1", "checkpoint-2"]
    os.makedirs(os.path.join(run, ".tmp-checkpoint-3", "checkpoint-3"))  # a save killed half-way
    args = small_args(tiny_llama, data, tmp_path / "out", resume_from_checkpoint="true")
    assert resume_checkpoint(args) == os.path.join(run, "checkpoint-2")


def test_batching_modes_train_to_the_same_first_loss(tmp_path, tiny_llama, caplog):
    """Padded, packed and padding-free (default) batches: the first step sees the same tokens, so the same
    loss; packing logs how full its rows are. All three run here, so the test compares them whatever else runs."""
    import logging

    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    first = {}
    for name, batching in (("padded", ["--padding_free", "false"]), ("packed", ["--packing", "true"]),
                           ("padding-free", [])):
        argv = ["--model_id_or_path", tiny_llama, "--dataset", data, "--output_dir", str(tmp_path / name),
                "--max_steps", "2", "--batch_size", "18", "--gradient_accumulation_steps", "1", "--logging_steps",
                "1", "--dataset_test_ratio", "0", "--max_length", "512", "--lora_dropout", "0", *batching]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="martlet"):
            result = sft_main(argv)
        first[name] = [h["loss"] for h in result["log_history"] if "loss" in h][0]
        if name == "packed":
            assert re.search(r"packing: 18 samples -> 2 rows of up to 512 tokens", caplog.text)
    # all 18 rows in the first step (packing: 2 rows of 10 and 8 samples, both in the batch)
    assert first["packed"] == pytest.approx(first["padded"], rel=1e-5), first
    assert first["padding-free"] == pytest.approx(first["padded"], rel=1e-5), first


def test_a_cache_entry_written_by_another_process_first_is_kept_quietly(tmp_path, caplog):
    """Two runs tokenizing the same rows at once (two test workers, two commands): the second rename fails
    because the entry exists; that is no error and costs nothing."""
    import datasets

    from martlet.data.cache import save_entry

    folder = tmp_path / "tokenized" / "entry"
    save_entry(datasets.Dataset.from_dict({"input_ids": [[1, 2]]}), {"rows": 1}, str(folder))
    first = sorted(os.listdir(folder))
    save_entry(datasets.Dataset.from_dict({"input_ids": [[3, 4]]}), {"rows": 1}, str(folder))
    assert sorted(os.listdir(folder)) == first == ["data", "stats.json"]
    assert datasets.load_from_disk(str(folder / "data"))["input_ids"] == [[1, 2]]
    assert "could not cache" not in caplog.text
    assert os.listdir(tmp_path / "tokenized") == ["entry"]  # no temporary folder left behind


def test_tokenized_rows_are_cached_between_runs(tmp_path, tiny_llama, caplog):
    import logging

    rows = [{**r, "messages": r["messages"] + []} for r in ROWS]
    rows[0] = {"messages": [{"role": "user", "content": f"cache probe {tmp_path}"},
                            {"role": "assistant", "content": "ok"}]}  # unique data: a fresh cache entry
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    argv = ["--model_id_or_path", tiny_llama, "--dataset", data, "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--batch_size", "2", "--dataset_test_ratio", "0"]
    with caplog.at_level(logging.INFO, logger="martlet"):
        sft_main(argv)
        assert "from the cache" not in caplog.text
        caplog.clear()
        sft_main(argv)
        assert "train: tokenized rows from the cache" in caplog.text
        caplog.clear()
        sft_main(argv + ["--max_length", "100"])  # anything that shapes the tokens makes a new entry
        assert "from the cache" not in caplog.text


def test_dry_run_shows_the_first_rows_loss_mask(tmp_path, tiny_models, capsys):
    """`--dry_run true` prints the first training row with exactly its assistant replies marked, and writes nothing."""
    from martlet.cli import main

    data = write_jsonl(tmp_path / "data.jsonl", ROWS)
    out = tmp_path / "output"
    for arch in ("llama", "gemma"):
        assert main(["sft", "--model_id_or_path", tiny_models[arch], "--dataset", data, "--output_dir", str(out),
                     "--dry_run", "true"]) == 0
        printed = capsys.readouterr().out
        assert printed.rstrip().endswith("arguments valid")
        head, shown = printed[printed.index("martlet: the first training row"):].split("\n", 1)
        line = int(re.search(r"data\.jsonl:(\d+)\)", head).group(1))  # the row it names ...
        reply = ROWS[line - 1]["messages"][1]["content"]
        assert re.findall(r"«(.*?)»", shown, flags=re.S) == [reply + ("<end_of_turn>" if arch == "gemma"
                                                                     else "<|im_end|>")]  # ... and its reply alone
        assert ROWS[line - 1]["messages"][0]["content"] in shown.split("«")[0]
    assert not out.exists()
    assert main(["sft", "--dataset", "alpaca-en", "--dry_run", "true"]) == 0
    assert "loss mask not shown: alpaca-en is on the hub" in capsys.readouterr().out

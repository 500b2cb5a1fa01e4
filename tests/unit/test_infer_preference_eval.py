"""`martlet infer --load_dataset_config` on a preference checkpoint (issue #25, item 4), without a model: the
held-out rows are read as preference rows, each evaluated as its prompt with the preferred reply as label."""

import pytest

from helpers import write_jsonl
from martlet.args.infer import InferArguments
from martlet.data.preprocess import split_train_val
from martlet.errors import MartletError
from martlet.infer.checkpoint import Checkpoint
from martlet.infer.evaluate import eval_rows, to_request

PAIRS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}."}
         for i in range(12)]


def checkpoint(tmp_path, **saved):
    """A checkpoint as the training run left it: only its saved arguments matter here."""
    return Checkpoint(str(tmp_path), True, {"dataset_seed": 42, **saved}, {})


def held_out(n, ratio, seed=42):
    """Indices of the rows that a split of n rows holds out (the split SFT and preference training share)."""
    return split_train_val(list(range(n)), ratio, seed)[1]


@pytest.mark.parametrize("rlhf_type", ["dpo", "orpo", "simpo", "cpo"])
def test_a_pair_checkpoint_evaluates_its_held_out_prompts_with_the_chosen_reply(tmp_path, rlhf_type):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    ckpt = checkpoint(tmp_path, rlhf_type=rlhf_type, dataset=[data], dataset_test_ratio=0.25)
    rows = eval_rows(InferArguments(load_dataset_config=True), ckpt)
    expected = [PAIRS[i] for i in held_out(12, 0.25)]
    requests = [to_request(r) for r in rows]
    assert [(r.query, r.label) for r in requests] == [(p["prompt"], p["chosen"]) for p in expected]
    assert len(requests) == 3 and [r["where"] for r in rows] == [f"{data}:{i + 1}" for i in held_out(12, 0.25)]
    first = eval_rows(InferArguments(load_dataset_config=True, val_dataset_sample=2), ckpt)
    assert first == rows[:2]


def test_a_kto_checkpoint_labels_with_the_desirable_completion(tmp_path):
    rows = [{"prompt": "a pair", "chosen": "right", "rejected": "wrong"},  # a pair gives two KTO rows
            {"prompt": "good one", "completion": "yes", "label": True},
            {"prompt": "bad one", "completion": "no", "label": False},
            {"messages": [{"role": "user", "content": "chat"}, {"role": "assistant", "content": "fine"}],
             "label": "true"}]
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    ckpt = checkpoint(tmp_path, rlhf_type="kto", dataset=[data], dataset_test_ratio=0, val_dataset=[data])
    requests = [to_request(r) for r in eval_rows(InferArguments(load_dataset_config=True), ckpt)]
    # one request per source row; an undesirable completion is no label: the prompt is answered, unscored
    assert [(r.query, r.label) for r in requests] == [("a pair", "right"), ("good one", "yes"), ("bad one", None),
                                                      ("chat", "fine")]
    sampled = eval_rows(InferArguments(load_dataset_config=True, val_dataset_sample=3), ckpt)
    assert [r["messages"][0]["content"] for r in sampled] == ["a pair", "good one", "bad one"]  # not KTO rows


def test_an_sft_checkpoint_still_reads_conversations(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"query": f"q{i}", "response": f"a{i}"} for i in range(8)])
    ckpt = checkpoint(tmp_path, dataset=[data], dataset_test_ratio=0.25)
    requests = [to_request(r) for r in eval_rows(InferArguments(load_dataset_config=True), ckpt)]
    assert [(r.query, r.label) for r in requests] == [(f"q{i}", f"a{i}") for i in held_out(8, 0.25)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(MartletError, match="unknown row format"):  # pairs are no SFT data
        eval_rows(InferArguments(load_dataset_config=True), checkpoint(tmp_path, dataset=[pairs]))

"""Dataset evaluation without a model: rows -> prompts and labels, results file, metrics, the chat loop."""

import json
import os

import pytest

from helpers import write_jsonl
from martlet.args.infer import InferArguments
from martlet.errors import MartletError
from martlet.infer.chat import chat_loop
from martlet.infer.evaluate import eval_rows, evaluate, metrics_path, result_path, to_request
from martlet.infer.metrics import bleu_4, compute_metrics, rouge_l, words
from martlet.infer.protocol import Delta, Output


class FakeEngine:
    """Replies from a table (or echoes), and records every conversation it was given."""

    def __init__(self, replies=None):
        self.replies = replies or {}
        self.seen = []

    def generate(self, conversations, config=None):
        self.seen += [list(c) for c in conversations]
        texts = [self.replies.get(c[-1]["content"], "echo " + c[-1]["content"]) for c in conversations]
        return [Output(text, 0, 0, "stop") for text in texts]

    def stream(self, conversations, config=None):
        reply = self.generate(conversations, config)[0].text
        for piece in reply.split(" ")[:1] + [" " + w for w in reply.split(" ")[1:]]:
            yield Delta(0, piece)


# metrics on hand-made cases ------------------------------------------------------------------------------
def test_chinese_is_segmented_into_words():
    assert words("我喜欢吃苹果") == ["我", "喜欢", "吃", "苹果"]
    assert words("The cat sat.") == ["The", "cat", "sat", "."]


def test_rouge_l_by_hand():
    # LCS of [a b c d] and [a b d] is 3: precision 1, recall 3/4, F = 2 * 0.75 / 1.75
    assert rouge_l("a b d", "a b c d") == pytest.approx(2 * 0.75 / 1.75)
    # Chinese by words: 3 of 4 words shared -> 0.75 (0 if Chinese were dropped, 4/6 by characters)
    assert rouge_l("我喜欢吃香蕉", "我喜欢吃苹果") == pytest.approx(0.75)
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


def test_bleu_4_by_hand():
    # n-gram precisions 4/5, 3/4, 2/3, 1/2 and no brevity penalty: BLEU = (0.2) ** 0.25
    assert bleu_4("a b c d e", "a b c d f") == pytest.approx(0.2 ** 0.25, abs=1e-6)
    assert bleu_4("完全 一样 的 句子 在 这里", "完全 一样 的 句子 在 这里") == pytest.approx(1.0)


def test_compute_metrics_means():
    metrics = compute_metrics(["Paris.", "a b d"], [" Paris. ", "a b c d"])
    assert metrics["count"] == 2
    assert metrics["exact_match"] == 0.5
    assert metrics["rouge-l"] == pytest.approx((1 + 2 * 0.75 / 1.75) / 2, abs=1e-4)
    assert compute_metrics([], []) == {"count": 0}


# rows -> requests -------------------------------------------------------------------------------------------
def test_to_request_splits_system_history_query_and_label():
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    req = to_request(row)
    assert (req.query, req.label, req.system, req.history) == ("q2", "a2", "S", [["q1", "a1"]])
    assert req.messages == row["messages"][:-1]
    unlabelled = to_request({"messages": [{"role": "user", "content": "hi"}]})
    assert unlabelled.label is None and unlabelled.messages == [{"role": "user", "content": "hi"}]
    with pytest.raises(MartletError, match="plain-text"):
        to_request({"text": "abc", "where": "f.jsonl:3"})


def test_evaluate_writes_results_and_metrics(tmp_path):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("q1", "Paris."), ("q2", "我喜欢吃苹果"), ("q3", "a b c d")]]
    rows.append({"messages": [{"role": "user", "content": "q4"}]})  # no label: in the results, not the metrics
    engine = FakeEngine({"q1": "Paris.", "q2": "我喜欢吃香蕉", "q3": "a b d", "q4": "free"})
    path = str(tmp_path / "r.jsonl")
    results, metrics = evaluate(engine, rows, None, batch_size=1, path=path, verbose=False)
    with open(path, encoding="utf-8") as fh:
        written = [json.loads(line) for line in fh]
    assert written == results
    assert written[1] == {"query": "q2", "response": "我喜欢吃香蕉", "label": "我喜欢吃苹果", "history": [],
                          "system": None}
    assert written[3]["label"] is None
    assert metrics["rows"] == 4 and metrics["labelled"] == 3
    assert metrics["exact_match"] == pytest.approx(1 / 3, abs=1e-4)
    assert metrics["rouge-l"] == pytest.approx((1 + 0.75 + 2 * 0.75 / 1.75) / 3, abs=1e-4)
    with open(metrics_path(path), encoding="utf-8") as fh:
        assert json.load(fh) == metrics


def test_result_path_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    first = result_path(InferArguments(ckpt_dir=str(ckpt)))
    assert os.path.dirname(first) == str(ckpt / "infer_result") and first.endswith(".jsonl")
    open(first, "w").close()
    assert result_path(InferArguments(ckpt_dir=str(ckpt))) != first  # never overwrites
    assert os.path.dirname(result_path(InferArguments())) == str(tmp_path / "output" / "infer_result")
    assert os.path.dirname(result_path(InferArguments(result_dir=str(tmp_path / "r")))) == str(tmp_path / "r")


def test_dataset_rows_held_out_like_training(tmp_path):
    from martlet.data.preprocess import split_train_val
    from martlet.data.sources import load_dataset_rows

    data = write_jsonl(tmp_path / "d.jsonl", [{"query": f"q{i}", "response": f"a{i}"} for i in range(40)])
    val = eval_rows(InferArguments(dataset=[data], dataset_test_ratio=0.1), None)
    _, expected = split_train_val(load_dataset_rows(data), 0.1, 42)
    assert [r["messages"] for r in val] == [r["messages"] for r in expected] and len(val) == 4
    every = eval_rows(InferArguments(dataset=[data], dataset_test_ratio=0, val_dataset_sample=7), None)
    assert [r["messages"][0]["content"] for r in every] == [f"q{i}" for i in range(7)]
    only = eval_rows(InferArguments(val_dataset=[data]), None)
    assert len(only) == 40


# the chat loop ------------------------------------------------------------------------------------------------
def scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_chat_keeps_history_clears_and_quits(capsys):
    engine = FakeEngine({"q1": "a1 first", "q2": "a2"})
    history = chat_loop(engine, read=scripted(["q1", "q2", "clear", "q3", "quit", "never read"]))
    assert engine.seen[1] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1 first"},
                              {"role": "user", "content": "q2"}]
    assert engine.seen[2] == [{"role": "user", "content": "q3"}]  # cleared
    assert history == [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "echo q3"}]
    out = capsys.readouterr().out
    assert "a1 first" in out and "History cleared." in out


def test_chat_multi_line_input_ends_with_hash():
    engine = FakeEngine()
    chat_loop(engine, system="Be brief.",
              read=scripted(["multi-line", "line one", "line two#", "single-line#", "plain", "exit"]))
    assert engine.seen[0] == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "line one\nline two"}]
    assert engine.seen[1][-1] == {"role": "user", "content": "plain"}


def test_ctrl_c_stops_a_reply_and_keeps_the_session(capsys):
    class Interrupted(FakeEngine):
        def stream(self, conversations, config=None):
            yield Delta(0, "partial")
            raise KeyboardInterrupt

    engine = Interrupted()
    history = chat_loop(engine, read=scripted(["tell me", "again"]))
    assert [m["content"] for m in history] == ["tell me", "partial", "again", "partial"]
    assert capsys.readouterr().out.count("[stopped]") == 2

"""Rows with nothing to learn are refused in every format (issue #25, item 3): an empty or blank assistant
reply, and, for training, a conversation that ends with a user turn. Each is reported as file:line: field and
collected with the other bad rows; inference keeps prompt-only rows; no defective row reaches tokenization."""

import contextlib
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import write_jsonl
from martlet.args.infer import InferArguments
from martlet.args.sft import PtArguments, SftArguments
from martlet.data.preference import load_preference_rows
from martlet.data.preprocess import encode_rows, train_val_rows
from martlet.errors import DatasetErrors
from martlet.infer.evaluate import eval_rows
from martlet.templates import get_template
from martlet.templates.template import Template

BLANKS = ["", " ", "\n\t ", "\u3000"]  # \u3000: the ideographic space


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def sft_rows(path):
    return train_val_rows(SftArguments(dataset=[str(path)], dataset_test_ratio=0))[0]


def problems(exc):
    return [(e.line, e.field) for e in exc.value.errors]


# each format, by hand --------------------------------------------------------------------------------------------
EMPTY_REPLIES = [
    ({"messages": [user("Hi"), bot("")]}, "messages"),
    ({"messages": [user("Hi"), bot(" \n"), user("Again"), bot("Yes")]}, "messages"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]}, "conversations"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "\t"}]}, "conversations"),
    ({"instruction": "Say hi", "output": ""}, "output"),
    ({"instruction": "Say hi", "output": "   "}, "output"),
    ({"query": "Hi", "response": ""}, "response"),
    ({"query": "Hi", "response": "ok", "history": [["Before", " "]]}, "history"),
    ({"instruction": "Hi", "output": "ok", "history": [["Before", ""]]}, "history"),
]


@pytest.mark.parametrize("row, field", EMPTY_REPLIES)
def test_an_empty_reply_is_refused_in_every_format_for_training_and_inference(tmp_path, row, field):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "fine", "response": "ok"}, row])
    with pytest.raises(DatasetErrors) as exc:
        sft_rows(path)
    assert problems(exc) == [(2, field)]
    assert str(exc.value).startswith(f"{path}:2: field '{field}': ")
    with pytest.raises(DatasetErrors) as exc:  # an empty label is no label either
        eval_rows(InferArguments(dataset=[path], dataset_test_ratio=0), None)
    assert problems(exc) == [(2, field)]


TRAILING = [
    ({"messages": [user("Hi")]}, "messages"),
    ({"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello"), user("And?")]}, "messages"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                        {"from": "human", "value": "More"}]}, "conversations"),
]


@pytest.mark.parametrize("row, field", TRAILING)
def test_a_trailing_user_turn_is_refused_for_sft_but_is_a_prompt_for_infer_and_text_for_pt(tmp_path, row, field):
    path = write_jsonl(tmp_path / "d.jsonl", [row, {"query": "fine", "response": "ok"}, row])
    with pytest.raises(DatasetErrors) as exc:
        sft_rows(path)
    assert problems(exc) == [(1, field), (3, field)]
    assert "ends with a user turn" in str(exc.value) and f"{path}:3: field '{field}'" in str(exc.value)
    prompts = eval_rows(InferArguments(dataset=[path], dataset_test_ratio=0), None)
    assert [r["messages"][-1]["role"] for r in prompts] == ["user", "assistant", "user"]
    pt = train_val_rows(PtArguments(dataset=[str(path)], dataset_test_ratio=0))[0]
    assert len(pt) == 3


def test_defects_are_collected_with_unparsable_lines_and_other_bad_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"query": "a", "response": "b"}), "{not json",
             json.dumps({"messages": [user("Hi"), bot("")]}), json.dumps({"query": "q"}),
             json.dumps({"conversations": [{"from": "human", "value": "Hi"}]})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetErrors) as exc:
        sft_rows(path)
    assert problems(exc) == [(2, None), (3, "messages"), (4, "response"), (5, "conversations")]


def test_registered_rows_report_every_bad_row():
    from martlet.data.sources import load_dataset_rows, register_dataset

    register_dataset("defects-in-memory", rows=[{"query": "a", "response": ""}, {"query": "b", "response": "c"},
                                                {"messages": [user("x"), bot(" ")]}], exist_ok=True)
    with pytest.raises(DatasetErrors) as exc:
        load_dataset_rows("defects-in-memory")
    assert problems(exc) == [(1, "response"), (3, "messages")]


PREFERENCE_DEFECTS = [
    ({"messages": [user("q"), bot(" ")], "rejected_response": "no"}, "messages"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}], "rejected_response": "no"},
     "conversations"),
    ({"messages": [user("q"), bot("yes"), user("and?")], "rejected_response": "no"}, "messages"),
    ({"query": "q", "history": [["h", ""]], "chosen": "yes", "rejected": "no"}, "history"),
    ({"prompt": [user("h"), bot("\n"), user("q")], "chosen": "yes", "rejected": "no"}, "messages"),
    ({"prompt": "q", "chosen": "", "rejected": "no"}, "chosen"),
    ({"prompt": "q", "chosen": "yes", "rejected": "\u3000"}, "rejected"),
]


@pytest.mark.parametrize("row, field", PREFERENCE_DEFECTS)
def test_preference_rows_with_an_empty_or_missing_reply_are_refused(tmp_path, row, field):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine", "chosen": "a", "rejected": "b"}, row, row])
    for kind in ("pair", "kto"):
        with pytest.raises(DatasetErrors) as exc:
            load_preference_rows(path, kind=kind)
        assert problems(exc) == [(2, field), (3, field)], kind


def test_kto_rows_with_an_empty_completion_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [
        {"prompt": "q", "completion": "fine", "label": True},
        {"messages": [user("q"), bot("")], "label": False},
        {"prompt": "q", "completion": " ", "label": True}])
    with pytest.raises(DatasetErrors) as exc:
        load_preference_rows(path, kind="kto")
    assert problems(exc) == [(2, "messages"), (3, "completion")]


# property: rows in every format with these defects, alone and combined, among valid rows -----------------------
WORDS = st.text(alphabet="abcxyz 你好?", min_size=1, max_size=8).filter(lambda t: t.strip())
BLANK = st.sampled_from(BLANKS)
FORMATS = ("messages", "sharegpt", "alpaca", "query-response")
DEFECTS = {"messages": ("empty_last", "empty_earlier", "trailing_user"),
           "sharegpt": ("empty_last", "empty_earlier", "trailing_user"),
           "alpaca": ("empty_last", "empty_earlier"), "query-response": ("empty_last", "empty_earlier")}


@st.composite
def rows(draw):
    """(raw row, its defects) in one of the formats, with none, one or several defects."""
    fmt = draw(st.sampled_from(FORMATS))
    defects = draw(st.one_of(st.just(set()), st.sets(st.sampled_from(DEFECTS[fmt]), min_size=1)))  # half valid
    turns = draw(st.integers(1, 3))
    pairs = [[draw(WORDS), draw(WORDS)] for _ in range(turns)]
    if "empty_last" in defects:
        pairs[-1][1] = draw(BLANK)
    if "empty_earlier" in defects:
        pairs.insert(0, [draw(WORDS), draw(BLANK)])
    system = draw(st.one_of(st.none(), WORDS))
    if fmt in ("messages", "sharegpt"):
        messages = [m for q, a in pairs for m in (user(q), bot(a))]
        if "trailing_user" in defects:
            if draw(st.booleans()):
                messages.append(user(draw(WORDS)))
            else:
                messages.pop()  # the reply is missing
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        if fmt == "messages":
            return {"messages": messages}, defects
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}, defects
    *history, (query, reply) = pairs
    row = {"instruction": query, "output": reply} if fmt == "alpaca" else {"query": query, "response": reply}
    if history:
        row["history"] = history
    if system is not None:
        row["system"] = system
    return row, defects


@pytest.fixture(scope="module")
def template(tokenizer):
    return get_template("AUTO", tokenizer)


@contextlib.contextmanager
def spying_on_encode(encoded):
    """Template.encode records every conversation it is given in `encoded` (and encodes it as usual)."""
    real = Template.encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Template, "encode", lambda self, messages: encoded.append(list(messages)) or real(self, messages))
        yield


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(rows(), min_size=1, max_size=8), ext=st.sampled_from([".jsonl", ".json"]))
def test_every_defective_row_is_reported_and_none_reaches_tokenization(tmp_path_factory, template, data, ext):
    folder = tmp_path_factory.mktemp("defects")
    path = folder / f"d{ext}"
    raws = [raw for raw, _ in data]
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in raws), encoding="utf-8")
        lines = list(range(1, len(raws) + 1))
    else:  # one row per line inside the array: row i starts on line i + 2
        path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in raws) + "\n]\n",
                        encoding="utf-8")
        lines = list(range(2, len(raws) + 2))
    defective = {line for line, (_, defects) in zip(lines, data) if defects}
    event("no defective row" if not defective else "one defective row" if len(defective) == 1 else "several")
    event("a row with combined defects" if any(len(d) > 1 for _, d in data) else "single defects only")

    encoded = []  # every conversation that reaches the tokenizer
    try:
        with spying_on_encode(encoded):
            train, _ = train_val_rows(SftArguments(dataset=[str(path)], dataset_test_ratio=0))
            encode_rows(train, template, cache=False)
    except DatasetErrors as exc:
        assert defective, str(exc)
        assert sorted(e.line for e in exc.errors) == sorted(defective)
        assert all(e.file == str(path) and e.field for e in exc.errors)
        assert str(exc).startswith(f"{path}:{min(defective)}: field '")
        assert len(defective) == 1 or f"[{len(defective)} problems in all]" in str(exc)
    else:
        assert not defective
        assert len(encoded) == len(raws)
    for messages in encoded:  # nothing defective was ever tokenized
        assert messages[-1]["role"] == "assistant"
        assert all(m["content"].strip() for m in messages if m["role"] == "assistant")


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(rows(), min_size=1, max_size=6))
def test_rows_given_in_python_are_checked_before_tokenization(template, data):
    """encode_rows is public: rows built in Python (no file reader) get the same checks."""
    canonical = []
    for i, (raw, defects) in enumerate(data, start=1):
        if "messages" in raw:
            messages = raw["messages"]
        elif "conversations" in raw:
            names = {"human": "user", "gpt": "assistant", "system": "system"}
            messages = [{"role": names[t["from"]], "content": t["value"]} for t in raw["conversations"]]
        else:
            continue  # alpaca/query-response have no canonical form without the reader
        canonical.append(({"messages": messages, "where": f"mem:{i}"}, defects))
    if not canonical:
        return
    encoded = []
    defective = [row["where"] for row, defects in canonical if defects]
    try:
        with spying_on_encode(encoded):
            encode_rows([row for row, _ in canonical], template, cache=False)
    except DatasetErrors as exc:
        assert [e.file for e in exc.errors] == defective
        assert not encoded
    else:
        assert not defective and len(encoded) == len(canonical)

"""Preference data: every row format gives the same pair, the prompt is SFT's, only reply tokens count."""

import json
import re
from fractions import Fraction

import pytest

from helpers import write_jsonl
from martlet.data.preference import (encode_preference, load_preference_rows, to_pair, to_unpaired)
from martlet.errors import MartletError
from martlet.templates import IGNORE_INDEX, get_template

SYSTEM = "You are terse."
HISTORY = [["Hi", "Hello!"]]
QUESTION, GOOD, BAD = "What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6."
PROMPT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": QUESTION}]

FORMATS = {
    "prompt/chosen/rejected": {"system": SYSTEM, "history": HISTORY, "prompt": QUESTION, "chosen": GOOD,
                               "rejected": BAD},
    "query + rejected_response": {"system": SYSTEM, "history": HISTORY, "query": QUESTION, "response": GOOD,
                                  "rejected_response": BAD},
    "messages + rejected_response": {"messages": PROMPT + [{"role": "assistant", "content": GOOD}],
                                     "rejected_response": BAD},
    "sharegpt pair": {"system": SYSTEM,
                      "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                        {"from": "human", "value": QUESTION}],
                      "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
    "sharegpt + rejected_response": {"system": SYSTEM, "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": QUESTION},
        {"from": "gpt", "value": GOOD}], "rejected_response": BAD},
    "trl explicit prompt": {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": GOOD}],
                            "rejected": [{"role": "assistant", "content": BAD}]},
    "trl implicit prompt": {"chosen": PROMPT + [{"role": "assistant", "content": GOOD}],
                            "rejected": PROMPT + [{"role": "assistant", "content": BAD}]},
    "alpaca + rejected_response": {"system": SYSTEM, "history": HISTORY, "instruction": QUESTION, "output": GOOD,
                                   "rejected_response": BAD},
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_gives_the_same_pair(name):
    assert to_pair(FORMATS[name]) == {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}


def test_kto_rows():
    rows = to_unpaired({"messages": PROMPT + [{"role": "assistant", "content": GOOD}], "label": "true"})
    assert rows == [{"prompt": PROMPT, "completion": GOOD, "label": True}]
    assert to_unpaired({"prompt": PROMPT, "completion": BAD, "label": 0})[0]["label"] is False
    assert to_unpaired({"system": SYSTEM, "history": HISTORY, "query": QUESTION, "response": BAD,
                        "label": False})[0] == {"prompt": PROMPT, "completion": BAD, "label": False}
    # a pair gives a desirable and an undesirable row
    assert [(r["completion"], r["label"]) for r in to_unpaired(FORMATS["prompt/chosen/rejected"])] == [
        (GOOD, True), (BAD, False)]


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [FORMATS["prompt/chosen/rejected"],
                                                  {"prompt": QUESTION, "chosen": GOOD}])
    with pytest.raises(MartletError) as err:
        load_preference_rows(path)
    assert (err.value.file, err.value.line, err.value.field) == (path, 2, "rejected")
    label_path = write_jsonl(tmp_path / "kto.jsonl", [{"query": QUESTION, "response": GOOD, "label": "maybe"}])
    with pytest.raises(MartletError, match="true or false") as err:
        load_preference_rows(label_path, kind="kto")
    assert (err.value.line, err.value.field) == (1, "label")
    with pytest.raises(MartletError, match="for KTO"):  # a `label` row in pair training
        load_preference_rows(label_path)
    with pytest.raises(MartletError, match="user turn"):
        to_pair({"messages": PROMPT + [{"role": "assistant", "content": GOOD}], "chosen": GOOD, "rejected": BAD})
    with pytest.raises(MartletError, match="share the conversation"):
        to_pair({"chosen": PROMPT + [{"role": "assistant", "content": GOOD}],
                 "rejected": PROMPT[1:] + [{"role": "assistant", "content": BAD}]})
    with pytest.raises(MartletError, match="file not found"):
        load_preference_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(MartletError, match="Did you mean: pref-math"):
        load_preference_rows("pref-maths")


def test_files_and_sampling(tmp_path):
    rows = [dict(FORMATS["prompt/chosen/rejected"], prompt=f"{QUESTION} ({i})") for i in range(5)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    loaded = load_preference_rows(path)
    assert [r["where"] for r in loaded] == [f"{path}:{i}" for i in range(1, 6)]
    assert len(load_preference_rows(f"{path}#3")) == 3 and len(load_preference_rows(f"{path}#12")) == 12
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps(rows))
    assert [r["prompt"] for r in load_preference_rows(str(as_json))] == [r["prompt"] for r in loaded]


# encoding --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template(tokenizer):
    return get_template("AUTO", tokenizer)


def test_only_the_reply_tokens_count(template, tokenizer):
    enc = encode_preference(to_pair(FORMATS["messages + rejected_response"]), template)
    # the prompt is exactly what generation sees, history and system included
    assert enc["prompt_ids"] == template.encode_prompt(PROMPT)
    # each reply is its text plus the end-of-turn marker: no prompt, no history reply, nothing after the marker
    assert tokenizer.decode(enc["chosen_ids"]) == GOOD + template.eot
    assert tokenizer.decode(enc["rejected_ids"]) == BAD + template.eot
    # and equals the loss tokens SFT would train on for the final turn
    full = template.encode(PROMPT + [{"role": "assistant", "content": GOOD}])
    start = len(enc["prompt_ids"])
    assert full.input_ids[:start] == enc["prompt_ids"]
    assert full.labels[start:start + len(enc["chosen_ids"])] == enc["chosen_ids"]
    assert all(label == IGNORE_INDEX for label in full.labels[start + len(enc["chosen_ids"]):])


def test_every_format_gives_the_same_tokens(template):
    encoded = {name: encode_preference(to_pair(row), template) for name, row in FORMATS.items()}
    first = next(iter(encoded.values()))
    assert all(enc == first for enc in encoded.values())


def test_system_argument_and_kto_encoding(tokenizer):
    template = get_template("AUTO", tokenizer, "Be brief.")
    row = {"prompt": [{"role": "user", "content": QUESTION}], "completion": GOOD, "label": True}
    enc = encode_preference(row, template)
    assert "Be brief." in tokenizer.decode(enc["prompt_ids"]) and enc["label"] is True
    assert tokenizer.decode(enc["completion_ids"]) == GOOD + template.eot


def test_length_limits(template):
    pair = to_pair(FORMATS["messages + rejected_response"])
    full = encode_preference(pair, template)
    longest = len(full["prompt_ids"]) + max(len(full["chosen_ids"]), len(full["rejected_ids"]))
    assert encode_preference(pair, template, longest) == full
    assert encode_preference(pair, template, longest - 1) is None  # delete
    cut = encode_preference(pair, template, longest - 3, "truncation_left")
    assert cut["prompt_ids"] == full["prompt_ids"][3:] and cut["chosen_ids"] == full["chosen_ids"]
    assert encode_preference(pair, template, len(full["chosen_ids"]), "truncation_left") is None  # no prompt left


# built-in sets ---------------------------------------------------------------------------------------------
def _final(text: str) -> str:
    return re.split(r"Answer: |答案：", text.rsplit("\n", 1)[-1])[-1]


def test_pref_math_pairs_are_checked_and_reproducible():
    rows = load_preference_rows("pref-math#40", seed=3)
    assert len(rows) == 40 and rows == load_preference_rows("pref-math#40", seed=3)
    assert rows != load_preference_rows("pref-math#40", seed=4)
    for row in rows:
        right, wrong = _final(row["chosen"]), _final(row["rejected"])
        assert Fraction(right) != Fraction(wrong) and Fraction(wrong) > 0, row
        chosen_lines, rejected_lines = row["chosen"].split("\n"), row["rejected"].split("\n")
        assert len(chosen_lines) == len(rejected_lines)
        for good, bad in zip(chosen_lines, rejected_lines):  # only the stated result changed, nothing else
            pieces = [re.split(r"(\d+(?:/\d+)?)", line) for line in (good, bad)]
            assert len(pieces[0]) == len(pieces[1]), (good, bad)
            assert all(g == b or (g, b) == (right, wrong) for g, b in zip(*pieces)), (good, bad)
    assert {bool(re.search("[\u4e00-\u9fff]", r["prompt"][-1]["content"])) for r in rows} == {True, False}
    english = load_preference_rows("pref-math-en#10")
    assert all(r["chosen"].rsplit("\n", 1)[-1].startswith("Answer: ") for r in english)


def test_pref_identity_needs_and_uses_the_names():
    with pytest.raises(MartletError, match="model_name"):
        load_preference_rows("pref-identity")
    rows = load_preference_rows("pref-identity", model_name=["小鹦", "Martlet"], model_author=["鸟社", "Birdhouse"])
    assert len(rows) > 200
    for row in rows:
        assert ("Martlet" in row["chosen"] or "小鹦" in row["chosen"]) and row["chosen"] != row["rejected"]
        assert "Martlet" not in row["rejected"] and "小鹦" not in row["rejected"]
    kto = load_preference_rows("pref-identity#10", kind="kto", model_name=["Martlet"], model_author=["Birdhouse"])
    assert len(kto) == 20 and sum(r["label"] for r in kto) == 10


def test_preference_sets_are_registered():
    from martlet.data.names import DatasetName
    from martlet.data.sources import dataset_registry

    assert DatasetName.pref_math == "pref-math" and DatasetName.pref_identity == "pref-identity"
    assert all(dataset_registry()[n]["preference"] for n in ("pref-math", "pref-math-en", "pref-math-zh",
                                                           "pref-identity"))
    with pytest.raises(MartletError, match="not a preference dataset"):
        load_preference_rows("self-cognition")


def test_sft_on_a_preference_set_learns_the_chosen_replies():
    from martlet.data.preprocess import conversation_rows

    rows = conversation_rows("pref-math#6", seed=3)
    pairs = load_preference_rows("pref-math#6", seed=3)
    assert [r["messages"] for r in rows] == [p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]
                                             for p in pairs]


def test_encoded_pairs_are_cached(template, tmp_path, monkeypatch):
    """A second run (or a second rank under torchrun) reads the encoded pairs back instead of re-encoding."""
    import martlet.data.preference as preference
    from martlet.data.preference import encode_preference_rows

    pairs = [to_pair({**FORMATS["messages + rejected_response"], "rejected_response": f"{BAD} {tmp_path} {i}"})
             for i in range(3)]  # unique rows: a fresh cache entry
    first, stats = encode_preference_rows(pairs, template, max_length=None)

    def must_not_run(*args, **kwargs):
        raise AssertionError("encoded again instead of read from the cache")

    monkeypatch.setattr(preference, "encode_preference", must_not_run)
    again, stats_again = encode_preference_rows(pairs, template, max_length=None)
    assert again.to_list() == first.to_list() and stats_again == stats
    with pytest.raises(AssertionError, match="encoded again"):  # what shapes the tokens is part of the key
        encode_preference_rows(pairs, template, max_length=500)
    with pytest.raises(AssertionError, match="encoded again"):
        encode_preference_rows(pairs, template, max_length=None, cache=False)

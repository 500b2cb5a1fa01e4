"""Every dataset format parses to the same canonical conversation; bad rows name file, line and field."""

import json

import pytest

from martlet.data.sources import load_dataset_rows, parse_spec, read_file, sample_rows
from martlet.errors import MartletError

EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?\nAnswer in one word."},
    {"role": "assistant", "content": "Paris"},
]

ROWS = {
    "messages": {"messages": EXPECTED},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello!"},
                                   {"from": "human", "value": "Capital of France?\nAnswer in one word."},
                                   {"from": "gpt", "value": "Paris"}]},
    "alpaca": {"system": "Be brief.", "instruction": "Capital of France?", "input": "Answer in one word.",
               "output": "Paris", "history": [["Hi", "Hello!"]]},
    "query-response": {"system": "Be brief.", "query": "Capital of France?\nAnswer in one word.",
                       "response": "Paris", "history": [["Hi", "Hello!"]]},
}


CASES = [(fmt, ext) for fmt in sorted(ROWS) for ext in (".jsonl", ".json")] + [("alpaca-flat", ".csv"),
                                                                             ("query-response-flat", ".csv")]
ROWS["alpaca-flat"] = {k: v for k, v in ROWS["alpaca"].items() if k != "history"}
ROWS["query-response-flat"] = {k: v for k, v in ROWS["query-response"].items() if k != "history"}


@pytest.mark.parametrize("fmt, ext", CASES)
def test_every_format_gives_the_same_conversation(tmp_path, fmt, ext):
    row = ROWS[fmt]
    path = tmp_path / f"data{ext}"
    if ext == ".jsonl":
        path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    elif ext == ".json":
        path.write_text(json.dumps([row, row], indent=2), encoding="utf-8")
    else:  # CSV cells are strings: only flat formats
        import csv

        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
    rows = read_file(str(path))
    expected = EXPECTED if "history" in row or fmt in ("messages", "sharegpt") else [EXPECTED[0], *EXPECTED[3:]]
    assert [r["messages"] for r in rows] == [expected] * len(rows)
    assert rows[0]["where"].startswith(str(path))


def test_csv_alpaca_without_history(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nSay hi,,Hi!\nAdd,1 and 2,3\n", encoding="utf-8")
    rows = read_file(str(path))
    assert rows[0]["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]
    assert rows[1]["messages"][0]["content"] == "Add\n1 and 2"
    assert rows[1]["where"] == f"{path}:3"


def test_plain_text_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "Once upon a time."}\n', encoding="utf-8")
    assert read_file(str(path))[0]["text"] == "Once upon a time."


def test_json_rows_know_their_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"query": "a", "response": "b"},\n\n  {"query": "c"}\n]\n', encoding="utf-8")
    with pytest.raises(MartletError) as err:
        read_file(str(path), needs_reply=True)  # training rows
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 4, "response")
    assert "missing" in err.value.message


def test_a_query_without_response_is_a_prompt_where_no_reply_is_needed(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"query": "2 + 3?", "solution": "5"}\n{"instruction": "Add", "input": "2 and 3"}\n',
                    encoding="utf-8")
    rows = read_file(str(path))  # GRPO prompts, inference rows
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": "2 + 3?"}],
                                             [{"role": "user", "content": "Add\n2 and 3"}]]
    with pytest.raises(MartletError) as err:
        read_file(str(path), needs_reply=True)
    assert (err.value.line, err.value.field) == (1, "response")


@pytest.mark.parametrize("content, line, field, words", [
    ('{"query": "a", "response": "b"}\n{"query": "a", "respons": "b"}\n', 2, "response", "missing"),
    ('{"query": "a", "response": "b"}\n{"query": "a", "response": "b"\n', 2, None, "malformed JSON"),
    ('{"instruction": "a", "output": 3.5}\n{"instruction": "a", "output": ["x"]}\n', 2, "output", "string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', 1, "messages", "role"),
    ('{"foo": 1}\n', 1, None, "unknown row format"),
    ('[1, 2]\n', 1, None, "JSON object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, content, line, field, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MartletError) as err:
        read_file(str(path), needs_reply=True)
    assert err.value.file == str(path) and err.value.line == line and err.value.field == field
    assert words in str(err.value)
    assert f"{path}:{line}:" in str(err.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(MartletError, match="empty"):
        read_file(str(empty))
    with pytest.raises(MartletError, match="not found"):
        load_dataset_rows(str(tmp_path / "nope.jsonl"))


def test_unknown_dataset_name_suggests_close_ones():
    with pytest.raises(MartletError, match="Did you mean: self-cognition"):
        load_dataset_rows("self-cognitoin")


def test_sampling_spec():
    assert parse_spec("self-cognition#20") == ("self-cognition", 20)
    assert parse_spec("data/x.jsonl") == ("data/x.jsonl", None)
    with pytest.raises(MartletError):
        parse_spec("x#zero")
    rows = [{"i": i} for i in range(10)]
    assert len(sample_rows(rows, 4, 1)) == 4 and sample_rows(rows, 4, 1) == sample_rows(rows, 4, 1)
    more = sample_rows(rows, 25, 1)  # more than the set: two whole copies plus 5 sampled rows
    assert len(more) == 25 and more[:20] == rows + rows


def test_builtin_sets():
    rows = load_dataset_rows("self-cognition#30", model_name=["小鹦", "Martlet"], model_author=["鸟社", "Birdhouse"])
    assert len(rows) == 30
    text = json.dumps([r["messages"] for r in rows], ensure_ascii=False)
    assert "{{NAME}}" not in text and ("Martlet" in text or "小鹦" in text)
    with pytest.raises(MartletError, match="model_name"):
        load_dataset_rows("self-cognition")
    math = load_dataset_rows("math-word-problems#12")
    assert len(math) == 12 and all(m["messages"][-1]["role"] == "assistant" for m in math)
    assert len(load_dataset_rows("general-instruct")) >= 150


def test_custom_dataset_info_with_column_mapping(tmp_path):
    from martlet.data.sources import register_dataset_info

    (tmp_path / "qa.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n', encoding="utf-8")
    info = tmp_path / "my_datasets.json"
    info.write_text(json.dumps({"my-qa": {"dataset_path": "qa.jsonl",
                                          "columns": {"question": "query", "answer": "response"}}}))
    assert register_dataset_info(str(info)) == ["my-qa"]
    rows = load_dataset_rows("my-qa#3")
    assert rows[0]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert len(rows) == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"broken": {"dataset_pth": "qa.jsonl"}}))
    with pytest.raises(MartletError) as err:
        register_dataset_info(str(bad))
    assert err.value.field == "broken" and "Did you mean: dataset_path" in str(err.value)


def test_every_bad_row_is_reported_first_few_then_a_count(tmp_path):
    from martlet.data.sources import read_file
    from martlet.errors import DatasetErrors

    good = json.dumps({"query": "hi", "response": "hello"})
    lines = [good, '{"query": "no response"}', "{not json", good, '{"query": 3, "response": []}',
             '{"instruction": ""}', "[1, 2]", '{"conversations": "x"}', '{"messages": []}', good]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"query": "\xff\xfe", "response": "x"}\n')
    with pytest.raises(DatasetErrors) as info:
        read_file(str(path), needs_reply=True)
    err = info.value
    assert [e.line for e in err.errors] == [2, 3, 5, 6, 7, 8, 9, 11]
    text = str(err)
    assert text.startswith(f"{path}:2: field 'response': ")
    assert "[8 problems in all]" in text and "... and 3 more" in text
    assert f"{path}:3: malformed JSON" in text and f"{path}:11:" not in text  # only the first five in full

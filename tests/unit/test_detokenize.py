"""A reply cut by max_tokens inside a character of several bytes (Chinese, an emoji) ends at the last whole
character, streamed or not, in `martlet infer` and in the server: never in U+FFFD (issue #25, item 7).

The SmolLM2 tokenizer spreads '晚' over three byte tokens and '🌍' over three; the tiny model is made to write
exactly the reply's tokens (transformers' sequence_bias), and the reply is cut after every one of them."""

import pytest

from martlet.infer.engine import TransformersEngine
from martlet.infer.generation import GenConfig, StreamText
from martlet.models.loader import load_model, load_tokenizer, resolve_model
from martlet.templates import get_template

REPLIES = ["春天，晚天，春晚", "Hello 🌍! 你好🌍", "🌍🌏"]
CONVERSATION = [{"role": "user", "content": "say it"}]


def whole_prefix(text: str, shown: str) -> str:
    """The longest prefix of `text`, in whole characters, that `shown` starts with."""
    n = 0
    while n < len(text) and n < len(shown) and shown[n] == text[n]:
        n += 1
    return text[:n]


def reply_ids(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    partial = [i for i in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:i])]
    assert partial, f"{text!r}: no cut falls inside a character; the test would prove nothing"
    return ids


def test_reply_tokens_split_characters(tokenizer):
    ids = reply_ids(tokenizer, REPLIES[0])
    assert tokenizer.decode(ids[:7]) == "春天，" + "\ufffd"  # what a cut reply used to end in


@pytest.mark.parametrize("text", REPLIES)
def test_stream_text_shows_whole_characters_at_every_cut(tokenizer, text):
    ids = reply_ids(tokenizer, text)
    for cut in range(1, len(ids) + 1):
        stream = StreamText(tokenizer, [])
        deltas = [stream.add([token]) for token in ids[:cut]] + [stream.finish()]
        shown = "".join(deltas)
        assert all("\ufffd" not in d for d in deltas), (cut, deltas)
        assert shown == whole_prefix(text, tokenizer.decode(ids[:cut])), (cut, shown)
    assert shown == text


@pytest.fixture(scope="module")
def engine(tiny_llama):
    spec = resolve_model(None, tiny_llama)
    template = get_template("AUTO", load_tokenizer(tiny_llama), max_length=256)
    return TransformersEngine(load_model(spec, dtype="fp32").eval(), template)


def forcing(engine, ids):
    """Make the model write `ids`: each token is pushed by the whole reply before it (a longer match, a larger
    bias, so an earlier repeat of a shorter context never wins)."""
    engine.model.generation_config.sequence_bias = {tuple(ids[: i + 1]): 100.0 * (i + 1) for i in range(len(ids))}


@pytest.mark.parametrize("text", REPLIES)
def test_cut_replies_end_in_whole_characters_streamed_or_not(engine, text):
    ids = reply_ids(engine.tokenizer, text)
    prompt = engine.template.encode_prompt(CONVERSATION)
    forcing(engine, ids)
    try:
        for cut in range(1, len(ids) + 1):
            expected = whole_prefix(text, engine.tokenizer.decode(ids[:cut]))
            config = GenConfig(max_new_tokens=cut, do_sample=False)
            replies = {
                "infer": engine.generate([CONVERSATION], config)[0].text,
                "infer stream": "".join(d.text for d in engine.stream([CONVERSATION], config)),
            }
            (output,) = engine.generate([prompt], config)  # the server sends token ids
            deltas = list(engine.stream([prompt], config))
            replies["deploy"] = output.text
            replies["deploy stream"] = "".join(d.text for d in deltas)
            replies["deploy stream output"] = deltas[-1].output.text
            for where, reply in replies.items():
                assert reply == expected, (where, cut, reply, expected)
            assert (output.completion_tokens, output.finish_reason) == (cut, "length")
            assert (deltas[-1].output.completion_tokens, deltas[-1].output.finish_reason) == (cut, "length")
            assert all("\ufffd" not in d.text for d in deltas)
    finally:
        engine.model.generation_config.sequence_bias = None
    assert expected == text

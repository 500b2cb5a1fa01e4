"""Labels are exactly the assistant replies plus their end-of-turn marker, for every template."""

import pytest

from helpers import CONVERSATION, EXTRA_SPECIAL
from martlet.errors import MartletError
from martlet.templates import IGNORE_INDEX, get_template, template_entry, template_names


@pytest.fixture(scope="module")
def tok(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIAL})
    return tok


def label_spans(ids, labels):
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize("name", template_names())
@pytest.mark.parametrize("with_system", [True, False])
def test_labels_are_the_assistant_replies(tok, name, with_system):
    template = get_template(name, tok)
    messages = CONVERSATION if with_system else CONVERSATION[1:]
    enc = template.encode(messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    spans = [tok.decode(span) for span in label_spans(enc.input_ids, enc.labels)]
    assert len(spans) == len(replies)
    eot = template.eot
    assert eot, f"{name}: no end-of-turn marker found"
    for span, reply in zip(spans, replies):
        assert span.endswith(eot)
        assert span[: -len(eot)].strip() == reply.strip()
    # the whole sequence decodes to the rendered text, and the prompt part equals what generation sees
    assert tok.decode(enc.input_ids) == template.render(template.with_system(messages))
    prompt = template.encode_prompt(messages[:-1])
    assert enc.input_ids[: len(prompt)] == prompt


def test_tokenizer_template_matches_apply_chat_template(tok):
    template = get_template("AUTO", tok)
    assert template.template_type == "tokenizer" and template.eot == "<|im_end|>"
    enc = template.encode(CONVERSATION)
    reference = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert enc.input_ids == list(reference)


def test_system_override_and_default(tok):
    default = get_template("smollm2", tok)
    assert "named SmolLM" in default.render(CONVERSATION[1:3])
    custom = get_template("smollm2", tok, default_system="You are Martlet.")
    text = custom.render(custom.with_system(CONVERSATION[1:3]))
    assert "You are Martlet." in text and "SmolLM" not in text


def test_truncation(tok):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    assert get_template("chatml", tok, max_length=50).encode(long) is None
    kept = get_template("chatml", tok, max_length=50, truncation_strategy="truncation_left").encode(long)
    assert len(kept.input_ids) == 50 and tok.decode([t for t in kept.labels if t != IGNORE_INDEX]) == "ok<|im_end|>"


def test_no_assistant_turn_is_an_error(tok):
    with pytest.raises(MartletError, match="no assistant turn"):
        get_template("chatml", tok).encode([{"role": "user", "content": "hi"}])


def test_unknown_template_suggests(tok):
    with pytest.raises(MartletError, match="Did you mean: llama3"):
        template_entry("llama33")

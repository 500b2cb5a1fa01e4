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


def test_get_template_refuses_an_unknown_keyword(tok):
    with pytest.raises(MartletError, match="no keyword 'max_lenght'. Did you mean: max_length"):
        get_template("chatml", tok, max_lenght=50)
    with pytest.raises(MartletError, match="no keyword 'system'"):
        get_template("AUTO", tok, system="Be brief.")


# seeing the mask ----------------------------------------------------------------------------------------------
MULTI_TURN = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."},
              {"role": "user", "content": "And times 4 <b>?</b>"},
              {"role": "assistant", "content": "5 × 4 = 20. 二十。"}]


def marked(text, left="«", right="»"):
    """The marked spans of a shown text and the text without the marks."""
    spans, rest, pos = [], [], 0
    while (start := text.find(left, pos)) >= 0:
        end = text.index(right, start + len(left))
        rest.append(text[pos:start])
        spans.append(text[start + len(left):end])
        rest.append(spans[-1])
        pos = end + len(right)
    rest.append(text[pos:])
    return spans, "".join(rest)


def _check_marks(template, messages):
    """The marked spans are the assistant replies (with the end-of-turn marker), in order; without the marks
    the text is the rendered conversation."""
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    spans, unmarked = marked(template.show(messages, style="plain"))
    assert len(spans) == len(replies)
    for span, reply in zip(spans, replies):
        assert span.endswith(template.eot) and span[: -len(template.eot)].strip() == reply
    assert unmarked == template.render(template.with_system(messages))
    return spans


def test_show_marks_exactly_the_assistant_replies(tokenizer):
    template = get_template("AUTO", tokenizer)
    spans = _check_marks(template, MULTI_TURN)
    assert spans == ["2 + 3 = 5.<|im_end|>", "5 × 4 = 20. 二十。<|im_end|>"]
    # html: the loss spans in <mark>, everything else escaped; ansi: the same spans in colour
    page = template.show(MULTI_TURN, style="html")
    assert marked(page, "<mark>", "</mark>")[0] == ["2 + 3 = 5.&lt;|im_end|&gt;", "5 × 4 = 20. 二十。&lt;|im_end|&gt;"]
    assert "&lt;b&gt;?&lt;/b&gt;" in page and "<b>" not in page
    ansi = template.show(MULTI_TURN, style="ansi")
    assert marked(ansi, "\033[1;32m", "\033[0m")[0] == spans
    assert template.show(MULTI_TURN) == template.show(MULTI_TURN, style="plain")  # not a terminal under pytest
    with pytest.raises(MartletError, match="unknown style 'htm'. Did you mean: html"):
        template.show(MULTI_TURN, style="htm")


def test_show_agrees_with_the_labels(tokenizer):
    """The marked text is the labels decoded: a label cut differently shows differently."""
    template = get_template("AUTO", tokenizer)
    enc = template.encode(MULTI_TURN)
    shown = "".join(text for text, loss in template.loss_spans(enc) if loss)
    assert shown == tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])
    last = max(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    enc.labels[last] = IGNORE_INDEX  # the last reply's end-of-turn marker without loss
    assert [t for t, loss in template.loss_spans(enc) if loss][-1] == "5 × 4 = 20. 二十。"


def test_show_with_a_tiny_models_template(tiny_models):
    from martlet.models.loader import load_tokenizer

    for arch in ("mistral", "gemma"):
        template = get_template("AUTO", load_tokenizer(tiny_models[arch]))
        assert template.eot
        _check_marks(template, MULTI_TURN)


def test_show_plain_text_and_dropped_rows(tokenizer):
    template = get_template("AUTO", tokenizer, max_length=8)
    assert template.show("one two three", style="plain") == "«one two three<|im_end|>»"
    assert template.show(MULTI_TURN * 3, style="plain") == "(dropped: longer than max_length=8 tokens)"

"""TransformersEngine on tiny models: batched greedy generation (left padded) equals generating the same
prompts one by one and plain transformers; streams equal whole replies; stop words end replies."""

import pytest

from martlet.infer.engine import TransformersEngine
from martlet.infer.generation import GenConfig
from martlet.infer.protocol import replies
from martlet.models.loader import load_model, load_tokenizer, resolve_model
from martlet.templates import get_template

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the capital of France? Please tell me about its history in detail."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "你好，世界"}, {"role": "assistant", "content": "你好！"},
     {"role": "user", "content": "a b c d e f g h i j k l m n o p q r s t u v w x y z"}],
    [{"role": "user", "content": "x"}],
]
GREEDY = GenConfig(max_new_tokens=16, do_sample=False)


def streamed(engine, conversation, config):
    """The text pieces the engine streams for one conversation."""
    return [delta.text for delta in engine.stream([conversation], config) if delta.text]


def scrambled_engine(folder, max_batch_size=8):
    """The tiny model with larger random weights, so that greedy replies differ from prompt to prompt."""
    import torch

    spec = resolve_model(None, folder)
    tokenizer = load_tokenizer(folder)
    template = get_template("AUTO", tokenizer, max_length=512)
    model = load_model(spec, dtype="fp32").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3, generator=generator)
    return TransformersEngine(model, template, max_batch_size=max_batch_size)


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {arch: scrambled_engine(folder) for arch, folder in tiny_models.items()}


def plain_transformers(engine, conversation, max_new_tokens):
    """The reference: transformers' generate on the unpadded prompt, cut at the template's stop words."""
    import torch

    ids = torch.tensor([engine.template.encode_prompt(conversation)])
    out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=engine.tokenizer.pad_token_id)
    text = engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)
    for stop in engine.template.stop_words:
        text = text.split(stop)[0]
    return text


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
def test_batched_greedy_equals_one_by_one(engines, arch):
    engine = engines[arch]
    batched = replies(engine, CONVERSATIONS, GREEDY)
    single = [replies(engine, [c], GREEDY)[0] for c in CONVERSATIONS]
    assert batched == single
    assert len(set(batched)) == len(batched)  # distinct replies: the comparison means something
    assert single[1] == plain_transformers(engine, CONVERSATIONS[1], 16)


def test_small_batches_keep_the_order(engines):
    engine = engines["llama"]
    small = TransformersEngine(engine.model, engine.template, max_batch_size=2)
    assert replies(small, CONVERSATIONS, GREEDY) == replies(engine, CONVERSATIONS, GREEDY)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_stream_equals_the_whole_reply(engines, arch):
    engine = engines[arch]
    for conversation in CONVERSATIONS[:3]:
        deltas = list(streamed(engine, conversation, GREEDY))
        assert len(deltas) > 3
        assert "".join(deltas) == replies(engine, [conversation], GREEDY)[0]


def test_stop_words_end_the_reply(engines):
    engine = engines["llama"]
    full = replies(engine, CONVERSATIONS[:2], GREEDY)
    word = full[0].strip().split()[2] if len(full[0].split()) > 3 else full[0][len(full[0]) // 2:][:4]
    stopped = GenConfig(max_new_tokens=16, do_sample=False, stop_words=[word])
    expected = full[0][: full[0].index(word)]
    assert replies(engine, CONVERSATIONS[:2], stopped)[0] == expected
    assert "".join(streamed(engine, CONVERSATIONS[0], stopped)) == expected
    # the other row of the batch is cut only where the stop word appears in its own reply
    assert replies(engine, CONVERSATIONS[:2], stopped)[1] == full[1].split(word)[0]


def test_sampling_with_a_seed_is_reproducible(engines):
    engine = engines["llama"]
    config = GenConfig(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=50, seed=7)
    first = replies(engine, CONVERSATIONS[:3], config)
    assert replies(engine, CONVERSATIONS[:3], config) == first
    assert first != replies(engine, CONVERSATIONS[:3], GREEDY)


def test_max_new_tokens_bounds_the_reply(engines):
    engine = engines["qwen2"]
    short = replies(engine, CONVERSATIONS[:1], GenConfig(max_new_tokens=3, do_sample=False))[0]
    long = replies(engine, CONVERSATIONS[:1], GREEDY)[0]
    assert len(engine.tokenizer(short, add_special_tokens=False)["input_ids"]) <= 4
    assert long.startswith(short) and len(long) > len(short)


def test_beam_search_streams_the_reply_at_once(engines):
    engine = engines["llama"]
    config = GenConfig(max_new_tokens=8, num_beams=2, do_sample=False)
    deltas = list(streamed(engine, CONVERSATIONS[0], config))
    assert deltas == replies(engine, CONVERSATIONS[:1], config)

"""Padding-free batches, packing and the lean loss give the same loss and gradients as padded batches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import shared_prefix_row

from martlet.train.batching import PaddingFreeCollator, pack_rows
from martlet.train.loss import causal_lm_loss, lean_loss_supported

IGNORE = -100


def _benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is no package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _samples(vocab: int, lengths=(7, 19, 3, 12), seed: int = 0):
    """Every other sample is plain text (`martlet pt`: every label a real token, the first one too), the others a
    masked prompt then a reply: the collator must ignore each sample's first label itself, or a row trains the
    last token of one sample to predict the first of the next, which a padded batch never does."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        prompt = 0 if i % 2 else max(1, n // 3)
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def test_the_first_label_of_every_sample_is_ignored():
    samples = _samples(100, lengths=(4, 3, 5, 2))
    assert [s["labels"][0] != IGNORE for s in samples] == [False, True, False, True]
    want = [IGNORE if p == 0 else t for s in samples for p, t in enumerate(s["labels"])]
    assert PaddingFreeCollator()(samples)["labels"][0].tolist() == want
    bare = [{"input_ids": s["input_ids"]} for s in samples]  # no labels: every token but the first of each
    assert PaddingFreeCollator()(bare)["labels"][0].tolist() == [IGNORE if p == 0 else t for s in samples
                                                                 for p, t in enumerate(s["input_ids"])]


def _padded(samples, pad_id: int = 0):
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# sdpa: transformers' block mask; martlet_varlen: each sample alone (what CPU training uses, train/varlen_attention.py)
@pytest.fixture(scope="module", params=[(arch, attn) for attn in ("sdpa", "martlet_varlen")
                                        for arch in ("llama", "qwen2", "gemma")], ids="-".join)
def model(request, tiny_models):
    from transformers import AutoModelForCausalLM

    from martlet.train.varlen_attention import register

    arch, attn = request.param
    m = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32,
                                             attn_implementation=register() if attn != "sdpa" else attn)
    m.config.use_cache = False
    return m.train()


def test_padding_free_row_matches_padded_batch(model):
    samples = _samples(model.config.vocab_size)
    padded = _padded(samples)
    flat = PaddingFreeCollator()(samples)
    assert flat["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in samples))
    assert flat["position_ids"][0].tolist() == [p for s in samples for p in range(len(s["input_ids"]))]
    ref = model(**padded).loss
    got = model(**flat).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ref_grads, got_grads = _grads(model, model(**padded).loss), _grads(model, model(**flat).loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def _chats(vocab: int, seed: int = 1):
    """Samples as a chat template makes them: one system prompt (8 tokens) then a user turn and a reply, the reply
    alone labelled; two users ask alike (their first 5 tokens), one sample is the system prompt and a short reply
    (labelled from its 9th token: nothing beyond the system prompt may be shared), one is plain text (all labelled)."""
    g = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(5, vocab, (n,), generator=g).tolist()  # noqa: E731
    system, question = tokens(8), tokens(5)
    chats = [(system + question + tokens(4), 13), (system + question + tokens(6), 13), (system + tokens(9), 12),
             (system + tokens(3), 8), (tokens(10), 0)]
    return [{"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]} for ids, prompt in chats]


def test_samples_that_begin_alike_share_their_unlabelled_beginning_with_the_same_loss_and_gradients(model):
    """`share_prefixes` (on where the attention is martlet_varlen): each sample's unlabelled beginning shared with
    an earlier one sits in the row once, and the loss and gradients are those of the row of whole samples."""
    from martlet.train.varlen_attention import reads_shared_prefixes, row_samples

    samples = _chats(model.config.vocab_size)
    plain, shared = PaddingFreeCollator()(samples), PaddingFreeCollator(share_prefixes=True)(samples)
    # shared: 12 tokens of the second sample (its system prompt and the question, up to its first labelled token),
    # 8 of the third and 7 of the fourth (its 8th token is the one before its first label); none of the plain text
    assert shared["input_ids"].shape[1] == plain["input_ids"].shape[1] - 12 - 8 - 7
    assert [s.prefix for s in row_samples(shared["position_ids"])] == [0, 12, 8, 7, 0]
    assert (shared["labels"] != IGNORE).sum() == (plain["labels"] != IGNORE).sum()
    if not reads_shared_prefixes(model.config, 64):  # sdpa: the sdpa mask cannot read such a row
        assert model.config._attn_implementation == "sdpa"
        return
    torch.testing.assert_close(causal_lm_loss(model, shared), causal_lm_loss(model, plain), rtol=1e-5, atol=1e-6)
    want, got = _grads(model, causal_lm_loss(model, plain)), _grads(model, causal_lm_loss(model, shared))
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_beginnings_survive_gradient_checkpointing(tiny_llama):
    """The recomputed forward pass reads the same position ids, so it attends as the first pass did."""
    from transformers import AutoModelForCausalLM

    from martlet.train.varlen_attention import register

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=register(),
                                                 use_cache=False).train()
    samples = _chats(model.config.vocab_size)
    want = _grads(model, causal_lm_loss(model, PaddingFreeCollator()(samples)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = _grads(model, causal_lm_loss(model, PaddingFreeCollator(share_prefixes=True)(samples)))
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_rows_share_beginnings_only_where_martlet_varlen_runs_every_layer_of_them():
    """What would send such a row to sdpa (which would let each piece attend to itself alone) turns sharing off."""
    from types import SimpleNamespace as Config

    from martlet.train.varlen_attention import NAME, reads_shared_prefixes

    assert reads_shared_prefixes(Config(_attn_implementation=NAME), 512)
    assert not reads_shared_prefixes(Config(_attn_implementation="sdpa"), 512)
    assert not reads_shared_prefixes(Config(_attn_implementation=NAME, attn_logit_softcapping=50.0), 512)
    windowed = Config(_attn_implementation=NAME, sliding_window=256)
    assert reads_shared_prefixes(windowed, 200) and not reads_shared_prefixes(windowed, 512)
    assert not reads_shared_prefixes(windowed, None)  # (no --max_length: any length)
    assert reads_shared_prefixes(Config(_attn_implementation=NAME, sliding_window=256, use_sliding_window=False), 512)
    dropout = Config(_attn_implementation=NAME, attention_dropout=0.1)
    assert not reads_shared_prefixes(dropout, 512) and reads_shared_prefixes(dropout, 512, training=False)
    assert not reads_shared_prefixes(Config(_attn_implementation=NAME, vision_config={}), 512)


def test_a_row_rounded_up_with_a_padding_sample_gives_the_same_loss_and_gradients(model):
    """What CPU training does (rows in steps of 64 tokens): the padding is a sample of its own with no labels."""
    padding_tokens = _benchmark("sft_throughput").padding_tokens  # (what the benchmark counts as padding)
    samples = _samples(model.config.vocab_size)  # 41 tokens
    plain, rounded = PaddingFreeCollator()(samples), PaddingFreeCollator(16, pad_token_id=3)(samples)
    assert rounded["input_ids"].shape == (1, 48) and padding_tokens(rounded) == 7 and padding_tokens(plain) == 0
    assert rounded["input_ids"][0, 41:].tolist() == [3] * 7 and rounded["labels"][0, 41:].eq(IGNORE).all()
    assert rounded["position_ids"][0, 41:].tolist() == list(range(7))  # its own sample: attends to nothing else
    exact = PaddingFreeCollator(41)(samples)
    assert exact["input_ids"].shape == (1, 41) and padding_tokens(exact) == 0  # already a multiple
    torch.testing.assert_close(causal_lm_loss(model, rounded), causal_lm_loss(model, plain), rtol=1e-6, atol=1e-6)
    want, got = _grads(model, causal_lm_loss(model, plain)), _grads(model, causal_lm_loss(model, rounded))
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_varlen_attention_pads_short_bf16_samples_to_repeating_shapes_with_the_same_result(monkeypatch):
    """bf16 on a CPU in the buckets (where the fused native pass does not run): each short sample runs padded to a
    multiple of 16 tokens (zero keys past its end, masked by causality; the padded queries dropped): the fp32
    result (unpadded) within bf16 rounding, gradients too."""
    import types

    monkeypatch.setenv("MARTLET_FUSED_ATTENTION", "0")

    from martlet.train.varlen_attention import varlen_attention

    lengths = [9, 30, 4, 16]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, sum(lengths), h, 16, generator=g).transpose(1, 2) for h in (6, 2, 2))
    module = types.SimpleNamespace(training=True, is_causal=True)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    inputs32 = [t.clone().requires_grad_() for t in (q, k, v)]
    inputs16 = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    want, _ = varlen_attention(module, *inputs32, None, position_ids=position_ids)
    got, _ = varlen_attention(module, *inputs16, None, position_ids=position_ids)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    upstream = torch.randn(want.shape, generator=g)
    for g16, g32 in zip(torch.autograd.grad(got, inputs16, upstream.bfloat16()), torch.autograd.grad(want, inputs32, upstream)):
        torch.testing.assert_close(g16.float(), g32, rtol=5e-2, atol=5e-2)


def test_bf16_samples_up_to_512_tokens_run_in_buckets_where_the_native_softmax_runs(monkeypatch):
    """On bf16 with the native causal softmax the buckets beat sdpa's CPU kernel up to ~1,000 tokens: samples up to
    512 run there (elsewhere up to 160); the result is fp32's within bf16 rounding, gradients too. (The buckets
    run where the fused native pass does not.)"""
    import types

    monkeypatch.setenv("MARTLET_FUSED_ATTENTION", "0")

    from martlet.train import native, varlen_attention

    lengths = [300, 40, 600]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, sum(lengths), h, 16, generator=g).transpose(1, 2) for h in (6, 2, 2))
    native_softmax = native.ops() is not None
    assert varlen_attention._bucket_max_len(q.bfloat16()) == (512 if native_softmax else 160)
    assert varlen_attention._bucket_max_len(q) == 160  # fp32: sdpa is as fast from ~170 tokens on
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    module = types.SimpleNamespace(training=True, is_causal=True)
    inputs32 = [t.clone().requires_grad_() for t in (q, k, v)]
    inputs16 = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    want, _ = varlen_attention.varlen_attention(module, *inputs32, None, position_ids=position_ids)
    got, _ = varlen_attention.varlen_attention(module, *inputs16, None, position_ids=position_ids)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    upstream = torch.randn(want.shape, generator=g)
    grads16 = torch.autograd.grad(got, inputs16, upstream.bfloat16())
    for g16, g32 in zip(grads16, torch.autograd.grad(want, inputs32, upstream)):
        torch.testing.assert_close(g16.float(), g32, rtol=5e-2, atol=5e-2)
    samples = tuple(varlen_attention.Sample(sum(lengths[:i]), n) for i, n in enumerate(lengths))
    layout = varlen_attention._layout(samples, 6, 2, 16, "cpu", 512)
    assert sorted(b.padded for b in layout.buckets) == [48, 304] and [s.length for s, _ in layout.long] == [600]


def test_short_samples_run_in_buckets_of_similar_lengths():
    """Short samples run batched, padded to the longest of their bucket: one long sample among short ones gets a
    bucket of its own (padding the others to its length would cost more than a bucket's calls), similar lengths
    share one; every (token, head) comes back to its place."""
    from martlet.train import varlen_attention

    def samples(lengths):
        return tuple(varlen_attention.Sample(sum(lengths[:i]), n) for i, n in enumerate(lengths))

    mixed = varlen_attention._layout(samples((40, 150, 30, 44, 200)), 6, 2, 16, "cpu")
    assert [(b.count, b.padded) for b in mixed.buckets] == [(3, 48), (1, 160)]
    assert mixed.long == [(varlen_attention.Sample(264, 200), None)]
    similar = varlen_attention._layout(samples((90, 81, 95, 87)), 6, 2, 16, "cpu")
    assert [(b.count, b.padded) for b in similar.buckets] == [(4, 96)]
    for layout, tokens in ((mixed, 464), (similar, 353)):
        assert sorted(layout.output_index.tolist()) == sorted(set(layout.output_index.tolist()))
        back = layout.output_inverse[layout.output_index]
        assert back.tolist() == list(range(tokens * 6))


def test_varlen_attention_equals_the_block_mask_on_long_and_short_samples(model):
    """Samples above EAGER_MAX_LEN go through sdpa's causal kernel, shorter ones through plain matmuls: both give
    sdpa-with-the-block-mask's logits and gradients; a padded batch (several rows, a mask) falls back to sdpa."""
    from transformers import AutoModelForCausalLM

    from martlet.train.varlen_attention import EAGER_MAX_LEN

    reference = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32,
                                                     attn_implementation="sdpa", use_cache=False).train()
    samples = _samples(model.config.vocab_size, lengths=(EAGER_MAX_LEN + 40, 5, EAGER_MAX_LEN, 1, 30))
    for batch in (PaddingFreeCollator()(samples), _padded(samples)):
        out, ref = model(**batch), reference(**batch)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        got, want = _grads(model, out.loss), _grads(reference, ref.loss)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_no_attention_across_samples(model):
    """Changing one sample leaves the logits of the others untouched."""
    samples = _samples(model.config.vocab_size)
    other = [dict(s) for s in samples]
    other[1] = {"input_ids": [7] * len(samples[1]["input_ids"]), "labels": samples[1]["labels"]}
    with torch.no_grad():
        a = model(**PaddingFreeCollator()(samples)).logits[0]
        b = model(**PaddingFreeCollator()(other)).logits[0]
    n0 = len(samples[0]["input_ids"])
    start2 = n0 + len(samples[1]["input_ids"])
    torch.testing.assert_close(a[:n0], b[:n0])
    torch.testing.assert_close(a[start2:], b[start2:])
    assert not torch.allclose(a[n0:start2], b[n0:start2])


@pytest.mark.parametrize("padding_free", [True, False])
def test_lean_loss_equals_library_loss(model, padding_free, monkeypatch):
    import martlet.train.loss as lean

    monkeypatch.setattr(lean, "CHUNK", 8)  # several chunks even on tiny batches
    assert lean_loss_supported(model)
    samples = _samples(model.config.vocab_size)
    batch = PaddingFreeCollator()(samples) if padding_free else _padded(samples)
    ref = model(**batch).loss
    got = causal_lm_loss(model, batch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ref_grads = _grads(model, model(**batch).loss)
    got_grads = _grads(model, causal_lm_loss(model, batch))
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(2 * n)), ref / 2,
                               rtol=1e-5, atol=1e-5)


def test_lean_loss_through_a_wrapper_matches(model):
    """A wrapped model (DDP, DeepSpeed) is asked for the labelled positions' logits through its forward."""
    samples = _samples(model.config.vocab_size)
    batch = _padded(samples)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            return self.module(**kw)

    torch.testing.assert_close(causal_lm_loss(Wrapper(model), batch), model(**batch).loss, rtol=1e-5, atol=1e-5)


def test_lean_loss_refuses_softcapped_models():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    assert not lean_loss_supported(Gemma2ForCausalLM(cfg))


def test_pack_rows_fits_capacity_and_keeps_every_sample():
    lengths = [5, 9, 3, 8, 2, 10, 1, 7]
    bins = pack_rows(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # 10 | 9+1 | 8+2 | 7+3 | 5


def test_packed_rows_give_the_same_loss_as_unpacked_samples(model):
    """--packing: samples packed into rows of at most 24 tokens, then collated, train on the same token losses."""
    import datasets

    from martlet.train.batching import pack_dataset

    samples = _samples(model.config.vocab_size, lengths=(7, 19, 3, 12, 5, 9, 16, 2))
    encoded = datasets.Dataset.from_list([{**s, "length": len(s["input_ids"])} for s in samples])
    packed = pack_dataset(encoded, 24, seed=1)
    assert len(packed) < len(samples) and max(packed["length"]) <= 24
    assert sorted(packed["input_ids"][0] + [t for row in packed["input_ids"][1:] for t in row]) == \
        sorted(t for s in samples for t in s["input_ids"])
    batch = PaddingFreeCollator()(list(packed))
    ref = model(**_padded(samples)).loss
    torch.testing.assert_close(model(**batch).loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal_lm_loss(model, batch), ref, rtol=1e-5, atol=1e-5)



def _causal(q, k, v):
    """Plain causal attention of one sequence: q (H, n, D), k/v (KV, n, D) -> (n, H, D)."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    out = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("fused", ["1", "0"], ids=["fused", "buckets"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trees", [[(5, [4, 6])], [(5, [4, 6]), (3, [2, 7, 1]), (0, [9])], [(100, [40, 30])],
                                   [(150, [20, 30]), (4, [3, 3])]],
                         ids=["a pair", "pairs, a group and a lone sample", "long", "long trunk, short branch"])
def test_varlen_attention_runs_shared_prefixes_as_the_whole_sequences(trees, dtype, fused, monkeypatch):
    """A sample that starts at position p > 0 continues the first p tokens of the last one that started at 0: each
    sequence (trunk, or the trunk's first p tokens then the branch) gets exactly the attention it would get alone,
    and the shared tokens' gradients sum what every sequence sends them (the fused native pass; the buckets where
    it does not run, sdpa beyond 160 tokens)."""
    import types

    monkeypatch.setenv("MARTLET_FUSED_ATTENTION", fused)

    from martlet.train.varlen_attention import row_samples, varlen_attention

    position_ids, sequences = shared_prefix_row(trees)  # each sequence's tokens in the row
    positions = position_ids[0].tolist()
    assert [s.prefix for s in row_samples(position_ids)] == [p for prefix, (_, *branches) in trees
                                                              for p in [0] + [prefix] * len(branches)]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, len(positions), 16, generator=g).to(dtype).requires_grad_() for h in (6, 2, 2))
    got, _ = varlen_attention(types.SimpleNamespace(training=True, is_causal=True), q, k, v, None,
                              position_ids=position_ids)
    upstream = torch.randn(got.shape, generator=g).to(dtype)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream)
    want, done, loss = torch.zeros_like(got[0]), set(), 0
    for tokens in sequences:  # each sequence alone; a token's output is its own sequence's (the trunk's, shared)
        index = torch.tensor(tokens)
        out = _causal(q[0][:, index].float(), k[0][:, index].float(), v[0][:, index].float())
        for j, t in enumerate(tokens):
            if t not in done:
                done.add(t)
                want[t] = out[j].detach().to(dtype)
                loss = loss + (out[j] * upstream[0, t].float()).sum()
    want_grads = torch.autograd.grad(loss, (q, k, v))
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(got[0].float(), want.float(), **tolerance)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a.float(), b.float(), **tolerance)


def test_a_row_with_shared_prefixes_never_falls_back_to_sdpa():
    """sdpa's mask would let each piece attend to itself alone: where martlet_varlen cannot run such a row (here:
    attention dropout in training), it stops."""
    import types

    from martlet.train.varlen_attention import varlen_attention

    q, k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    with pytest.raises(RuntimeError, match="share prefixes"):
        varlen_attention(types.SimpleNamespace(training=True, is_causal=True), q, k, v, None, dropout=0.1,
                         position_ids=torch.tensor([[0, 1, 2, 3, 4, 2, 3]]))


def test_varlen_attention_cuts_rows_at_position_restarts(tiny_llama, monkeypatch, tmp_path):
    """The per-sample path really runs for a padding-free row (and sdpa only for what it does not handle)."""
    import transformers.integrations.sdpa_attention as sdpa_module
    from transformers import AutoModelForCausalLM

    from martlet.train.varlen_attention import Sample, register, row_samples

    assert row_samples(torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])) == [Sample(0, 3), Sample(3, 2), Sample(5, 1),
                                                                            Sample(6, 4)]
    assert row_samples(torch.tensor([[5, 6, 7]])) == [Sample(0, 3)]  # one sample that starts later still is one sample
    assert row_samples(torch.tensor([[0, 1, 2, 3, 2, 1, 2, 0, 1, 5]])) == [  # shared prefixes: p > 0 after a trunk
        Sample(0, 4), Sample(4, 1, 0, 2), Sample(5, 2, 0, 1), Sample(7, 2), Sample(9, 1)]  # (too short a trunk)
    assert row_samples(torch.tensor([[0, 1], [0, 1]])) is None and row_samples(None) is None
    fallbacks = []
    real = sdpa_module.sdpa_attention_forward
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **k: fallbacks.append(1) or real(*a, **k))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=register(),
                                                 use_cache=False)
    samples = _samples(model.config.vocab_size)
    model(**PaddingFreeCollator()(samples))
    assert fallbacks == []
    model(**_padded(samples))
    assert len(fallbacks) == model.config.num_hidden_layers
    model.config.save_pretrained(str(tmp_path))  # a checkpoint loads anywhere: the name is never saved
    assert "martlet_varlen" not in (tmp_path / "config.json").read_text()


def test_the_layers_of_a_forward_pass_cut_their_shared_row_once(tiny_llama, monkeypatch):
    """Every layer gets the same position ids: the row is cut at its restarts once a forward pass, again for other
    position ids, and again when the same tensor was changed in place."""
    from transformers import AutoModelForCausalLM

    from martlet.train import varlen_attention

    cuts = []
    real = varlen_attention.row_samples
    monkeypatch.setattr(varlen_attention, "row_samples", lambda ids: cuts.append(ids) or real(ids))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32,
                                                 attn_implementation=varlen_attention.register(), use_cache=False)
    assert model.config.num_hidden_layers > 1
    batch = PaddingFreeCollator()(_samples(model.config.vocab_size))
    whole = model(**batch).logits
    assert len(cuts) == 1
    batch["position_ids"] = batch["position_ids"].clone()
    torch.testing.assert_close(model(**batch).logits, whole)
    assert len(cuts) == 2
    ids = batch["position_ids"]
    assert varlen_attention._row_samples_once(ids) == tuple(real(ids)) and len(cuts) == 2
    ids[0, 1:] = torch.arange(ids.shape[1] - 1)  # now two samples: the first token alone, then the rest
    assert varlen_attention._row_samples_once(ids) == (varlen_attention.Sample(0, 1),
                                                      varlen_attention.Sample(1, ids.shape[1] - 1))
    assert len(cuts) == 3

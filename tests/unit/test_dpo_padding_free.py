"""Padding-free preference batches: DPO/KTO's wrapper of trl's fused-LM-head forward (`padding_free_fused_forward`)
and ORPO/SimPO/CPO's `padding_free_sequence_logps` give the same per-token log-probs, metrics fields and gradients
as the padded batches they replace."""

from __future__ import annotations

import copy

import pytest
import torch

from martlet.train.rlhf_trainers import padding_free_fused_forward

FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "label_mask")


def _batch(vocab: int, left: bool, pairs: bool = False):
    """[chosen..., rejected...] of different lengths, padded to the longest; prompts and padding carry -100. With
    `pairs`, each rejected sequence begins as its chosen one does: 4 tokens (its 3-token prompt and its first reply
    token against the chosen one's prompt) and 5 (prompts of 4 and 3, and more)."""
    g = torch.Generator().manual_seed(0)
    lengths, prompts = [9, 14, 6, 11], [4, 4, 3, 3]
    tokens = [torch.randint(5, vocab, (n,), generator=g) for n in lengths]
    if pairs:
        tokens[2][:4], tokens[3][:5] = tokens[0][:4], tokens[1][:5]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        span = slice(width - n, width) if left else slice(0, n)
        ids[i, span] = tokens[i]
        mask[i, span] = 1
        labels[i, span] = ids[i, span]
        labels[i, span.start:span.start + p] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module", params=[("sdpa", False), ("martlet_varlen", False), ("martlet_varlen", True)],
                ids=["sdpa", "martlet_varlen", "martlet_varlen, frozen head: Martlet's scoring"])
def models(request, tiny_llama):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from martlet.train.varlen_attention import register

    attn, frozen_head = request.param
    padded = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, use_cache=False,
                                                  attn_implementation=register() if attn != "sdpa" else "sdpa").train()
    if frozen_head:  # as under LoRA: the fields then come from `_scored_row` (TokenScores), not trl's head
        padded.get_output_embeddings().weight.requires_grad_(False)
    add_fused_lm_head(padded, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    flat = copy.deepcopy(padded)
    padding_free_fused_forward(flat)
    with torch.no_grad():  # the guard of Martlet's scoring runs at the first call (a tiny row of its own)
        flat(**_batch(flat.config.vocab_size, False), fused_lm_head=True)
    return padded, flat


@pytest.fixture(params=[1, 16], ids=["row as is", "row rounded up"])
def multiple(request, monkeypatch):
    """Rows rounded up to a multiple of 16 tokens (on a CPU in bf16: 64) with a padding sequence of their own."""
    from martlet.train import rlhf_trainers

    monkeypatch.setattr(rlhf_trainers, "_row_multiple", lambda model, device_type: request.param)
    return request.param


@pytest.mark.parametrize("kernels", [True, False], ids=["native kernels", "plain torch (AVX2, ARM)"])
@pytest.mark.parametrize("pairs", [False, True], ids=["apart", "pairs begin alike"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_padding_free_fused_forward_matches_the_padded_batch(models, left, pairs, multiple, kernels, monkeypatch):
    """Pairs that begin alike are computed once up to where they part when Martlet scores them (a frozen head, on a
    CPU with or without the native kernels) and the attention is `martlet_varlen` (the row is 9 tokens shorter); the
    fields and gradients stay those of the padded batch."""
    from martlet.train import native, rlhf_trainers

    if not kernels:  # as where they do not run: TokenScores' torch code
        monkeypatch.setattr(native, "ops", lambda: None)
        monkeypatch.setattr(native, "usable", lambda *tensors: None)
    padded, flat = models
    batch = _batch(padded.config.vocab_size, left, pairs)
    scored = []
    apply = rlhf_trainers.TokenScores.apply
    monkeypatch.setattr(rlhf_trainers.TokenScores, "apply", lambda *a: scored.append(1) or apply(*a))
    calls = []
    backbone = flat.model.forward
    flat.model.forward = lambda *a, **k: calls.append(k["input_ids"].shape) or backbone(*a, **k)
    try:
        want, got = padded(**batch, fused_lm_head=True), flat(**batch, fused_lm_head=True)
    finally:
        del flat.model.forward
    frozen = not padded.get_output_embeddings().weight.requires_grad
    ours = frozen
    assert len(scored) == ours  # a frozen head on a CPU: Martlet's scoring
    shared = 9 if pairs and ours and flat.config._attn_implementation == "martlet_varlen" else 0
    real = int(batch["attention_mask"].sum()) - shared  # 40 tokens
    assert calls == [(1, -(-real // multiple) * multiple)]  # one row of real tokens, rounded up when asked
    for name in FIELDS:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)

    def grads(model, out):
        model.zero_grad()
        (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_grads, got_grads = grads(padded, want), grads(flat, got)
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():  # fp32 sums in another order (rows of other lengths): the error grows with |g|
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().max().item()), msg=name)


def test_other_calls_go_to_the_fused_forward_unchanged(models):
    """Generation-style calls (no fused head) and single sequences are not rewritten."""
    padded, flat = models
    batch = _batch(padded.config.vocab_size, False)
    with torch.no_grad():
        torch.testing.assert_close(flat(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   padded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
        one = {k: v[:1] for k, v in batch.items()}
        torch.testing.assert_close(flat(**one, fused_lm_head=True).log_probs, padded(**one, fused_lm_head=True).log_probs)


@pytest.mark.parametrize("pairs", [False, True], ids=["apart", "pairs begin alike"])
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_padding_free_sequence_logps_match_the_padded_ones(models, left, pairs, multiple):
    """ORPO, SimPO and CPO: summed reply log-probs and token counts, and their gradients (pairs that begin alike
    computed once up to where they part, under `martlet_varlen`)."""
    from martlet.train.rlhf_trainers import padding_free_sequence_logps, sequence_logps

    model = models[0]
    batch = _batch(model.config.vocab_size, left, pairs)
    batch["completion_mask"] = batch.pop("labels").ne(-100).long()

    def run(fn):
        model.zero_grad()
        logps, counts = fn(model, batch)
        (logps * torch.linspace(0.5, 2.0, len(logps))).sum().backward()
        return logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_counts, want_grads = run(sequence_logps)
    calls = []
    backbone = model.model.forward
    model.model.forward = lambda *a, **k: calls.append(k["input_ids"].shape) or backbone(*a, **k)
    try:
        got, got_counts, got_grads = run(padding_free_sequence_logps)
    finally:
        del model.model.forward
    real = int(batch["attention_mask"].sum()) - (9 if pairs and model.config._attn_implementation != "sdpa" else 0)
    assert calls == [(1, -(-real // multiple) * multiple)]
    assert got_counts.tolist() == want_counts.tolist() == [5, 10, 3, 8]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for name, g in want_grads.items():  # fp32 sums in another order (rows of other lengths): the error grows with |g|
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5 * max(1.0, g.abs().max().item()), msg=name)


def test_rows_are_rounded_up_where_new_matrix_shapes_cost_kernel_builds(tiny_llama):
    """On a CPU in bf16 (weights or autocast) the row goes to a multiple of 64 tokens, as sft's rows do."""
    from transformers import AutoModelForCausalLM

    from martlet.train.rlhf_trainers import _row_multiple

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert _row_multiple(model, "cpu") == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _row_multiple(model, "cpu") == 64
    assert _row_multiple(model.to(torch.bfloat16), "cpu") == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_martlet_s_scoring_divides_by_grpo_s_temperature(tiny_llama, caplog, monkeypatch, dtype):
    """GRPO's fused head divides the logits by the sampling temperature (in fp32, after a product in the activations'
    dtype): Martlet's scoring (a frozen head, as under LoRA) does the same when told, with trl's fields and
    gradients, bf16 autocast included (dividing the bf16 hidden states instead had moved log-probs of the embedded
    model by up to 0.2); not told, its guard sees the difference and trl's head scores (trl's numbers, one warning)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from martlet import patches
    from martlet.train import rlhf_trainers

    monkeypatch.setattr(patches, "_warned", set())

    def model(temperature):
        m = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype, use_cache=False).train()
        m.get_output_embeddings().weight.requires_grad_(False)
        add_fused_lm_head(m, temperature=0.7, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        if temperature is not None:
            padding_free_fused_forward(m, temperature)
        return m

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = m(**batch, fused_lm_head=True)
        m.zero_grad()
        (out.log_probs * weights).sum().backward(retain_graph=True)
        return out, {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}

    batch = _batch(model(None).config.vocab_size, False)
    weights = torch.randn(batch["labels"].shape[0], batch["labels"].shape[1] - 1,
                          generator=torch.Generator().manual_seed(3))
    for told in (0.7, 1.0):
        flat = model(told)
        with monkeypatch.context() as patched:  # trl's head on the same padding-free row: the reference
            patched.setattr(rlhf_trainers, "_scores_itself", lambda *a: False)
            want, want_grads = run(flat)
        scored = []
        apply = rlhf_trainers.TokenScores.apply
        with monkeypatch.context() as patched:
            patched.setattr(rlhf_trainers.TokenScores, "apply", lambda *a: scored.append(1) or apply(*a))
            got, grads = run(flat)
        for name in FIELDS:
            torch.testing.assert_close(got[name].float(), want[name].float(), rtol=1e-4, atol=1e-4,
                                       msg=f"{told}: {name}")
        ours = len(scored) == 2  # the guard's tiny row, then the batch (trl's head: the guard's row alone)
        assert ours == (told == 0.7), told
        for name, g in want_grads.items():  # bf16: the head's gradient is rounded where trl's is not
            torch.testing.assert_close(grads[name], g, **({"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32
                                                         else {"rtol": 0.05, "atol": 0.05 * float(g.abs().max())}),
                                       msg=name)
    assert any("'trl_token_scores' is off" in r.getMessage() for r in caplog.records)

@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_sequences_that_begin_alike_share_their_beginning_in_the_row(left):
    """`_sequences_row` with sharing: every sequence's tokens sit in the row at their own positions, and the samples
    `martlet_varlen` reads from the positions attend, for each sequence, to exactly its own tokens in order; shared
    tokens appear once. Cases: a pair, one sequence the other's beginning, a group of three alike (GRPO), a
    sequence alike to none, one that shares as many tokens as the branch before it holds (it must not join it)."""
    from martlet.train.rlhf_trainers import _sequences_row
    from martlet.train.varlen_attention import row_samples

    sequences = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 8], [7, 8, 9], [7, 8, 9, 10], [7, 8, 6], [4, 4],
                 [1, 2, 3, 9, 5, 6], [1, 2, 3, 9, 5, 6, 7]]
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, span], mask[i, span] = torch.tensor(seq), 1
    row, positions, slot = _sequences_row(ids, mask, share=True)
    plain = _sequences_row(ids, mask, share=False)
    assert len(plain[0]) == sum(map(len, sequences)) and (plain[1] == 0).sum() == len(sequences)
    assert len(row) < len(plain[0]) and len(set(slot[mask.bool()].tolist())) == len(row)  # each row token once
    samples = row_samples(positions[None])
    owner = {t: s for s in samples for t in range(s.start, s.start + s.length)}
    for b, seq in enumerate(sequences):
        where = slot[b][mask[b].bool()]
        assert row[where].tolist() == seq and positions[where].tolist() == list(range(len(seq)))
        assert owner[int(where[-1])].keys() == where.tolist()  # what its last token attends to: all of it, in order
    assert (slot[~mask.bool()] == -1).all()

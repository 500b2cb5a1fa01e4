"""Frozen weights packed for oneDNN (`martlet.train.packed`, patch `packed_weights`): torch's products, the same
values, only while they fit and only for the weights they were packed from."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from martlet import patches
from martlet.train import packed
from .test_kernels import _lora_model, _loss_and_grads


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(patches, "_verdicts", {})
    monkeypatch.setattr(patches, "_warned", set())
    monkeypatch.delenv("MARTLET_PACKED_WEIGHTS", raising=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 37, 64, 300])
def test_packed_products_are_torch_s(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(96, 40, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 80, generator=g).to(dtype)[:, ::2]  # a strided view, as a reshape can give
    dy = torch.randn(rows, 96, generator=g).to(dtype)
    want = F.linear(x, weight, bias), F.linear(x, weight), dy @ weight
    weight._martlet_packed = packed.PackedWeight.of(weight)
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(packed.linear(x, weight, bias), want[0], **tolerance)
    torch.testing.assert_close(packed.linear(x, weight), want[1], **tolerance)
    torch.testing.assert_close(packed.input_grad(dy, weight), want[2], **tolerance)


def test_a_weight_changed_after_packing_runs_torch_s_product(monkeypatch):
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 16, generator=g), requires_grad=False)
    x, dy = torch.randn(8, 16, generator=g), torch.randn(8, 32, generator=g)
    weight._martlet_packed = pw = packed.PackedWeight.of(weight)
    assert pw.fits(weight)
    with torch.no_grad():
        weight.mul_(2)  # in place: a new version
    assert not pw.fits(weight)
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a))  # would give None
    torch.testing.assert_close(packed.linear(x, weight), F.linear(x, weight))
    torch.testing.assert_close(packed.input_grad(dy, weight), dy @ weight)
    weight._martlet_packed = pw = packed.PackedWeight.of(weight)
    weight.data = torch.randn(32, 16, generator=g)  # another storage
    assert not pw.fits(weight)
    torch.testing.assert_close(packed.linear(x, weight), F.linear(x, weight))
    assert not calls


def _lean_loss_and_grads(model, batch):
    from martlet.train.loss import causal_lm_loss

    model.zero_grad()
    loss = causal_lm_loss(model, batch)  # Martlet's loss: the LM head's products in `LinearCrossEntropy`
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("qwen2", torch.float32)])  # qwen2: q/k/v biases
def test_training_on_packed_weights_gives_the_same_loss_gradients_and_reference(tiny_models, arch, dtype):
    """A LoRA model's loss and adapter gradients, and its adapters-off (reference) logits, are the same inside
    `packed_frozen_weights` as outside; inside, every fused layer's base weight and the LM head's hold a packed
    copy; after, none does."""
    from martlet.train.kernels import fuse_lora, fused_disable_adapter

    model = _lora_model(tiny_models[arch], dtype=dtype)
    fused = fuse_lora(model)
    fused_disable_adapter(model)
    ids = torch.randint(5, 200, (2, 12))
    batch = {"input_ids": ids, "labels": ids}

    def run():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss, grads = _lean_loss_and_grads(model, batch)
            with torch.no_grad(), model.disable_adapter():
                reference = model(input_ids=ids).logits
        return loss, grads, reference

    want = run()
    weights = [m.base_layer.weight for m in model.modules() if hasattr(m, "lora_A")]
    weights.append(model.get_output_embeddings().weight)  # the LM head, the lean loss's
    with packed.packed_frozen_weights(model) as count:
        assert count == fused + 1 == len(weights)
        assert all(isinstance(w.__dict__.get("_martlet_packed"), packed.PackedWeight) for w in weights)
        got = run()
    assert not any("_martlet_packed" in w.__dict__ for w in weights)
    exact = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(got[0], want[0], **exact)
    torch.testing.assert_close(got[2], want[2], **exact)
    assert got[1].keys() == want[1].keys() and len(got[1]) > 0
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, **exact, msg=name)


def test_packing_is_used_by_the_products(tiny_models, monkeypatch):
    """Inside the context the base products and the loss's head run on the packed weights (not just held)."""
    from martlet.train.kernels import fuse_lora

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    layers = fuse_lora(model)
    assert patches.usable("packed_weights", torch.bfloat16, key=torch.bfloat16)  # (its products: not counted)
    found = []
    plain = packed._packed_copy
    monkeypatch.setattr(packed, "_packed_copy", lambda weight: found.append(plain(weight)) or found[-1])
    ids = torch.randint(5, 200, (1, 8))
    with packed.packed_frozen_weights(model) as count, torch.autocast("cpu", dtype=torch.bfloat16):
        _lean_loss_and_grads(model, {"input_ids": ids, "labels": ids})
    assert count == layers + 1 and all(p is not None for p in found)
    assert count < len(found) <= 2 * count  # each forward product, and the input's gradient where it is asked for


def test_token_scores_on_a_packed_head_are_the_same(tiny_models):
    """Preference training's head (`TokenScores`): the same fields and gradient with the head packed."""
    from martlet.train.kernels import TokenScores

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(70, 32, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(300, 32, generator=g).to(torch.bfloat16)
    target = torch.randint(0, 300, (70,), generator=g)

    def scores():
        fields = TokenScores.apply(hidden, weight, target, 64)
        (grad,) = torch.autograd.grad(fields[0].sum(), hidden)
        return (*fields, grad)

    want = scores()
    weight._martlet_packed = packed.PackedWeight.of(weight)
    got = scores()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_packing_stays_off_when_asked_or_when_the_copies_would_not_fit(tiny_models, monkeypatch):
    from martlet.train.kernels import fuse_lora

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    fuse_lora(model)
    monkeypatch.setenv("MARTLET_PACKED_WEIGHTS", "0")
    with packed.packed_frozen_weights(model) as count:
        assert count == 0
    monkeypatch.delenv("MARTLET_PACKED_WEIGHTS")
    weights = sum(w.nbytes for w in packed.frozen_cpu_weights(model))
    memory = packed.MEMORY_SHARE * 2 * weights  # exactly enough room
    monkeypatch.setattr(packed.os, "sysconf", lambda name: memory if name == "SC_PHYS_PAGES" else 1)
    with packed.packed_frozen_weights(model) as count:
        assert count > 0
    monkeypatch.setattr(packed.os, "sysconf", lambda name: memory - 1 if name == "SC_PHYS_PAGES" else 1)
    with packed.packed_frozen_weights(model) as count:
        assert count == 0
    monkeypatch.setenv("MARTLET_PACKED_WEIGHTS", "1")  # forced on
    with packed.packed_frozen_weights(model) as count:
        assert count > 0
    trainable = _lora_model(tiny_models["llama"])  # peft's own layers (not fused): nothing to pack
    with packed.packed_frozen_weights(trainable) as count:
        assert count == 0


def test_without_the_private_ops_the_weights_stay_plain_and_one_warning_says_why(tiny_models, monkeypatch, caplog):
    from martlet.train.kernels import fuse_lora

    model = _lora_model(tiny_models["llama"], dtype=torch.bfloat16)
    fuse_lora(model)
    ids = torch.randint(5, 200, (1, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="martlet"):
        with packed.packed_frozen_weights(model) as count, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(input_ids=ids).logits
    assert count == 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    records = {id(r): r for r in caplog.records}.values()  # (a record can reach caplog's handler twice)
    warnings = [r.getMessage() for r in records if "'packed_weights'" in r.getMessage()]
    assert len(warnings) == 1 and "oneDNN" in warnings[0]

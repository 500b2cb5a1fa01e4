"""The fused autograd functions of `martlet.train.kernels` give the values and gradients of the unfused
computation they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from martlet.train.kernels import LinearCrossEntropy, keep_factor

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)"))]


def _reference_ce(hidden, weight, bias, target):
    logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    return F.cross_entropy(logits.float(), target, reduction="sum")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [4, 7, 1000])
def test_linear_cross_entropy_matches_the_library_in_fp32(with_bias, chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    target = torch.randint(0, 50, (23,), generator=g)
    inputs = [t for t in (hidden, weight, bias) if t is not None]

    want = _reference_ce(hidden, weight, bias, target) * 0.37  # any upstream scale reaches every gradient
    want_grads = torch.autograd.grad(want, inputs)
    got = LinearCrossEntropy.apply(hidden, weight, bias, target, chunk) * 0.37
    got_grads = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(got_grads, want_grads):
        torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_under_bf16_autocast_matches_and_keeps_the_dtypes(device):
    """As Martlet trains with LoRA: bf16 hidden states, a frozen bf16 head, fp32 softmax."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=g).to(device, torch.bfloat16).requires_grad_()
    weight = torch.randn(300, 32, generator=g).to(device, torch.bfloat16)  # frozen: no gradient asked for
    target = torch.randint(0, 300, (40,), generator=g).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        want = _reference_ce(hidden, weight, None, target)
        got = LinearCrossEntropy.apply(hidden, weight, None, target, 16)
    (want_grad,) = torch.autograd.grad(want, hidden)
    (got_grad,) = torch.autograd.grad(got, hidden)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad, rtol=2e-2, atol=1e-3)  # bf16 rounding of the projection


def test_lean_loss_without_gradients_needs_no_autograd_function(monkeypatch):
    """Evaluation (no_grad) sums chunk losses directly: same value, nothing stored."""
    from martlet.train import kernels, loss

    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(8, 30, bias=False)
    hidden, target = torch.randn(11, 8, generator=g), torch.randint(0, 30, (11,), generator=g)
    monkeypatch.setattr(loss, "CHUNK", 4)
    monkeypatch.setattr(kernels.LinearCrossEntropy, "apply", None)  # would fail if called
    with torch.no_grad():
        got = loss.summed_cross_entropy(hidden, target, head)
    torch.testing.assert_close(got, _reference_ce(hidden, head.weight, None, target))


def _lora_model(tiny_dir, dtype=torch.float32, dropout=0.0, **extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype, use_cache=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM", **extra))
    for name, param in model.named_parameters():
        if "lora_" in name:  # B starts at zero: give both factors values, so every gradient path is exercised
            param.data = torch.randn_like(param, dtype=torch.float32) * 0.1
    return model.train()


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q, k, v
def test_fused_lora_gives_peft_values_and_gradients(tiny_models, arch):
    from martlet.train.kernels import fuse_lora

    ids = torch.randint(5, 200, (2, 12))
    batch = {"input_ids": ids, "labels": ids}
    peft_model, fused = _lora_model(tiny_models[arch]), _lora_model(tiny_models[arch])
    assert fuse_lora(fused) == sum(1 for n, _ in fused.named_modules() if n.endswith(".lora_A"))
    want_loss, want = _loss_and_grads(peft_model, batch)
    got_loss, got = _loss_and_grads(fused, batch)
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys() and len(got) > 0
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad(), fused.disable_adapter():  # the adapter switched off: peft's path, the base model
        base_logits = fused(input_ids=ids).logits
    with torch.no_grad():
        assert not torch.allclose(fused(input_ids=ids).logits, base_logits)
        fused.merge_adapter()  # merged: the base layer alone, same logits as the fused adapter gave
        merged_logits = fused(input_ids=ids).logits
        fused.unmerge_adapter()
        torch.testing.assert_close(merged_logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_lora_under_bf16_autocast_matches_peft(tiny_models, device):
    """As `martlet sft` trains LoRA: bf16 base weights, fp32 adapters, bf16 autocast."""
    from martlet.train.kernels import fuse_lora

    ids = torch.randint(5, 200, (2, 12)).to(device)
    batch = {"input_ids": ids, "labels": ids}
    models = [_lora_model(tiny_models["llama"], dtype=torch.bfloat16).to(device) for _ in range(2)]
    fuse_lora(models[1])
    results = []
    for model in models:
        with torch.autocast(device, dtype=torch.bfloat16):
            results.append(_loss_and_grads(model, batch))
    (want_loss, want), (got_loss, got) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-2, atol=1e-2)
    for name, grad in want.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], grad, rtol=5e-2, atol=5e-3, msg=name)


def test_fused_lora_dropout_gradients_and_eval():
    """With dropout the forward pass draws a mask; for a fixed draw the hand-written gradients are exact
    (gradcheck in float64), and in eval mode there is no dropout."""
    from martlet.train.kernels import LoraLinear

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    a = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def fused(x, a, b, p=0.4):
        torch.manual_seed(11)  # the same mask at every call gradcheck makes
        return LoraLinear.apply(x, weight, bias, a, b, 2.0, p)

    assert torch.autograd.gradcheck(fused, (x, a, b))
    plain = x @ weight.t() + bias + 2.0 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(fused(x, a, b, 0.0), plain)
    dropped = fused(x, a, b)
    assert not torch.allclose(dropped, plain)
    torch.manual_seed(11)
    keep, kept = keep_factor(torch.Size((10, 6)), 0.4, x.dtype, x.device)
    kept_x = x * keep.view(x.shape) / kept
    torch.testing.assert_close(dropped - (x @ weight.t() + bias), 2.0 * kept_x @ a.t() @ b.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_factor_keeps_each_element_with_probability_one_minus_p(p, dtype):
    torch.manual_seed(0)
    keep, kept = keep_factor(torch.Size((1000, 1001)), p, dtype, torch.device("cpu"))  # odd: a partial last word
    assert keep.shape == (1000, 1001) and keep.dtype == dtype
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(kept - (1 - p)) < 2 ** -14
    flat = keep.flatten().double()
    assert abs(flat.mean().item() - kept) < 5e-3  # ~5 standard deviations at 1e6 draws
    for lane in range(4):  # every lane cut from the random words keeps as often as the others
        assert abs(flat[lane::4].mean().item() - kept) < 1e-2
    assert abs((flat[1:] * flat[:-1]).mean().item() - kept ** 2) < 5e-3  # neighbours drawn independently


def test_fused_disable_adapter_gives_the_base_model_without_peft_s_switch(tiny_models):
    """Patch `peft_fused_disable_adapter`: a fused LoRA policy's `disable_adapter()` (trl's reference) gives the base
    model's logits, as peft's own switch does, without flipping peft's per-layer flags; the adapters are back after
    it. Merged adapters, or a layer the fused path does not cover, take peft's switch: the same logits."""
    from martlet.train.kernels import adapters_switch_off, fuse_lora, fused_disable_adapter

    ids = torch.randint(5, 200, (2, 12))
    plain, model = _lora_model(tiny_models["llama"]), _lora_model(tiny_models["llama"])
    with torch.no_grad(), plain.disable_adapter():
        base = plain(input_ids=ids).logits
    with torch.no_grad():
        adapted = plain(input_ids=ids).logits
    assert not torch.allclose(base, adapted)
    assert not adapters_switch_off(model)  # peft's own layers: nothing fused yet
    fuse_lora(model)
    assert fused_disable_adapter(model) and fused_disable_adapter(model)  # idempotent
    assert adapters_switch_off(model)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base)
            assert not any(m.disable_adapters for m in layers)  # peft's switch not used
        torch.testing.assert_close(model(input_ids=ids).logits, adapted)
        model.merge_adapter()  # merged into the base weights: peft's switch (it unmerges)
        assert not adapters_switch_off(model)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=1e-4, atol=1e-4)
            assert all(m.disable_adapters for m in layers)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    partial = _lora_model(tiny_models["llama"])
    fuse_lora(partial)
    first = next(m for m in partial.modules() if hasattr(m, "lora_A"))
    first.__class__ = first.__class__.__mro__[1]  # one layer back to peft's own class and forward
    del first.forward
    fused_disable_adapter(partial)
    assert not adapters_switch_off(partial)
    with torch.no_grad(), partial.disable_adapter():
        torch.testing.assert_close(partial(input_ids=ids).logits, base)


def test_an_adapter_added_after_fusing_runs_fused_when_active_and_plain_lora(tiny_models, monkeypatch):
    """trl's GRPO copies the adapter into a 'ref' adapter after Martlet fused the layers and switches to it for its
    reference: the fused path runs whichever single adapter is active, with that adapter's weights (the values and
    gradients peft gives); an added adapter it cannot compute (DoRA) runs peft's own path."""
    from peft import LoraConfig

    from martlet.train import kernels

    ids = torch.randint(5, 200, (2, 12))
    batch = {"input_ids": ids, "labels": ids}
    models = []
    for fused in (False, True):
        model = _lora_model(tiny_models["llama"])
        if fused:
            kernels.fuse_lora(model)
        torch.manual_seed(1)
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules="all-linear", task_type="CAUSAL_LM"))
        model.add_adapter("dora", LoraConfig(r=2, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM"))
        for name, param in model.named_parameters():
            if ".other." in name or ".dora." in name:
                param.data = torch.randn_like(param) * 0.1
        models.append(model)
    calls = []
    apply = kernels.LoraLinear.apply
    monkeypatch.setattr(kernels.LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    layers = sum(1 for n, _ in models[1].named_modules() if n.endswith(".lora_A"))
    for adapter, fused_calls in (("other", layers), ("default", layers), ("dora", 0)):
        for model in models:
            model.set_adapter(adapter)
        calls.clear()
        got_loss, got = _loss_and_grads(models[1], batch)
        assert len(calls) == fused_calls, adapter
        want_loss, want = _loss_and_grads(models[0], batch)
        torch.testing.assert_close(got_loss, want_loss, msg=adapter)
        assert got.keys() == want.keys() and any(f".{adapter}." in n for n in got), adapter
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fuse_lora_leaves_dora_to_peft(tiny_models):
    from martlet.train.kernels import fuse_lora

    assert fuse_lora(_lora_model(tiny_models["llama"], use_dora=True)) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_fused_lora_dropout_trains_on_the_device(tiny_models, device):
    """Dropout on: each call draws a new mask (two passes differ), eval mode has none (two passes agree)."""
    from martlet.train.kernels import fuse_lora

    model = _lora_model(tiny_models["llama"], dropout=0.3).to(device)
    assert fuse_lora(model) > 0
    ids = torch.randint(5, 200, (2, 12)).to(device)
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
        assert not torch.allclose(first, second)
        model.eval()
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    _, grads = _loss_and_grads(model, {"input_ids": ids, "labels": ids})
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())

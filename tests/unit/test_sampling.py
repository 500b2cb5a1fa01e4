"""`infer.sampling` (patch `fast_cpu_sampling`): one token a row drawn by inverse-CDF sampling with the probabilities
given, never a zero-probability token; every call it does not take goes to torch's `multinomial` (its errors
included); installed, transformers' sampling uses it (top-k 1 sampling is greedy decoding) and a guard that does not
find the generation module's `torch` leaves the module alone."""

from __future__ import annotations

import types

import pytest
import torch

from martlet import patches
from martlet.infer import sampling


@pytest.fixture(autouse=True)
def _restore():
    yield
    patches.restore_globals()


def test_draws_follow_the_weights_and_never_a_zero_one():
    weights = torch.tensor([0.5, 0.0, 1.0, 1.5, 2.0, 0.0, 1e-3])  # not normalized: weight / sum
    rows = 40_000
    torch.manual_seed(0)
    drawn = sampling.inverse_cdf_sample(weights.repeat(rows, 1))
    assert drawn.shape == (rows, 1) and drawn.dtype == torch.int64
    counts = torch.bincount(drawn.flatten(), minlength=len(weights)).double()
    expected = weights.double() / weights.sum() * rows
    assert counts[1] == 0 and counts[5] == 0
    kept = expected > 0
    chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    assert chi2 < 22.5, (counts, expected)  # 4 degrees of freedom: p < 1e-4 by chance
    torch.manual_seed(0)
    assert torch.equal(sampling.inverse_cdf_sample(weights.repeat(rows, 1)), drawn)  # a seeded run repeats itself


def test_a_one_hot_row_gives_its_token_even_at_the_ends():
    probs = torch.zeros(3, 49_152)
    probs[0, 0] = probs[1, -1] = probs[2, 1234] = 1.0
    assert sampling.inverse_cdf_sample(probs).flatten().tolist() == [0, 49_151, 1234]


@pytest.mark.parametrize("call", [
    lambda m, p: m.multinomial(p, 2),  # more samples
    lambda m, p: m.multinomial(p[0], 1),  # one row, 1-D
    lambda m, p: m.multinomial(p, 1, generator=torch.Generator().manual_seed(1)),
])
def test_what_it_does_not_take_goes_to_torch(call, monkeypatch):
    seen = []
    original = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: seen.append(1) or original(*a, **k))
    view = sampling.SamplingTorch(torch)
    probs = torch.softmax(torch.randn(2, 50), -1)
    call(view, probs)
    assert seen == [1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_invalid_rows_get_torch_s_error(bad):
    probs = torch.softmax(torch.randn(2, 50), -1)
    probs[1, 3] = bad
    view = sampling.SamplingTorch(torch)
    assert not sampling.takes(probs, 1, None, None)
    with pytest.raises(RuntimeError):
        view.multinomial(probs, 1)
    with pytest.raises(RuntimeError):
        view.multinomial(torch.zeros(2, 50), 1)  # a row that sums to zero


def test_every_other_name_is_torch_s():
    view = sampling.SamplingTorch(torch)
    assert view.cat is torch.cat and view.Tensor is torch.Tensor and view.float32 is torch.float32
    assert view.__name__ == "torch"


def test_installed_transformers_sampling_uses_it_and_top_k_one_is_greedy(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.generation import utils

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.randint(5, 200, (3, 6))
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert sampling.install() and sampling.install()  # once
    assert isinstance(utils.torch, sampling.SamplingTorch)
    drawn = []
    sample = sampling.inverse_cdf_sample
    monkeypatch.setattr(sampling, "inverse_cdf_sample", lambda probs: drawn.append(probs.shape) or sample(probs))
    with torch.no_grad():
        top1 = model.generate(input_ids=ids, do_sample=True, top_k=1, max_new_tokens=6, min_new_tokens=6)
    assert len(drawn) == 6 and all(shape[0] == 3 for shape in drawn)
    assert torch.equal(top1, greedy)
    patches.restore_globals()
    assert utils.torch is torch


def test_a_generation_module_without_torch_is_left_alone(caplog):
    module = types.ModuleType("fake_generation_utils")
    module.torch = types.ModuleType("not_torch")
    assert not patches.patch_global("fast_cpu_sampling", module, "torch", sampling.SamplingTorch)
    assert module.torch.__name__ == "not_torch"
    assert any("fast_cpu_sampling" in r.getMessage() for r in caplog.records)

"""The fused autograd functions of `martlet.train.kernels` give the values and gradients of the unfused
computation they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from martlet.train.kernels import LinearCrossEntropy


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


def test_linear_cross_entropy_under_bf16_autocast_matches_and_keeps_the_dtypes():
    """As Martlet trains with LoRA on a CPU: bf16 hidden states, a frozen bf16 head, fp32 softmax."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(300, 32, generator=g).to(torch.bfloat16)  # frozen: no gradient asked for
    target = torch.randint(0, 300, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
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
        got = loss._chunked_sum(hidden, target, head)
    torch.testing.assert_close(got, _reference_ce(hidden, head.weight, None, target))

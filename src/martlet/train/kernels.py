"""Fused autograd functions in plain torch: fewer operations and no recomputation on the training hot path.

Each one computes what a chain of library modules computes, with its gradients written by hand, so the
autograd graph holds one node instead of a dozen and the backward pass reads only what it needs. They run on
any device (plain torch ops). The equivalence with the unfused computation, values and gradients, is tested
in `tests/unit/test_kernels.py` and `tests/unit/test_batching.py`.
"""

from __future__ import annotations

import torch


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `target`, `chunk` rows at a time.

    The gradients are computed in the forward pass, chunk by chunk (d logits = softmax - one-hot, projected
    back through the weight), so at most one chunk of logits exists at once, none is kept for the backward
    pass and nothing is recomputed there: the backward pass only scales the stored gradients. The projection
    runs in the activations' dtype (bf16 under autocast), the softmax in fp32, as the library's loss does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk):
        from martlet.train.loss import logits_fp32

        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], target[start:start + chunk]
            logits = logits_fp32(h, weight, bias)
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, y[:, None])[:, 0]).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
            grad[torch.arange(len(y), device=y.device), y] -= 1
            if grad_b is not None:
                grad_b += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start:start + chunk] = grad @ w
            if grad_w is not None:
                grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors

        def scaled(grad, dtype=None):
            return None if grad is None else (grad * grad_total).to(dtype or grad.dtype)

        return scaled(grad_h), scaled(grad_w, ctx.dtypes[0]), scaled(grad_b, ctx.dtypes[1]), None, None

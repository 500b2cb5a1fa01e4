"""The native CPU kernels (`martlet.train.native`) build on this machine, compute what the torch code they
replace computes (values and gradients), draw an unbiased dropout mask, and step aside when they cannot run."""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
import sys
import types

import pytest
import torch
from helpers import shared_prefix_row
import torch.nn.functional as F

from martlet.train import native


@pytest.fixture(scope="module")
def kernels():
    found = native.ops()
    assert found is not None, "the native kernels did not build: is a C++ compiler (g++) installed?"
    return found


def _seeded(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _mask(kernels, rows, k, seed, threshold) -> torch.Tensor:
    """The 0/1 mask (fp32) the LoRA kernels apply to a (rows x k) input for (seed, threshold)."""
    return kernels.dropout_mask(rows, k, seed, threshold).float()


# ---- dropout ------------------------------------------------------------------------------------------------
def test_dropout_mask_of_an_element_depends_only_on_the_seed_and_its_place(kernels):
    """Inputs of any number of rows agree on their common rows, and the parallel split of the work changes
    nothing; widths that are not a multiple of the 32-element groups are cut, not shifted."""
    big = _mask(kernels, 517, 91, 7, 30000)
    for rows in (1, 3, 4, 5, 64, 500):
        torch.testing.assert_close(_mask(kernels, rows, 91, 7, 30000), big[:rows], rtol=0, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = _mask(kernels, 517, 91, 7, 30000)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one_thread, big, rtol=0, atol=0)
    torch.testing.assert_close(_mask(kernels, 9, 96, 7, 30000)[:, :91], big[:9], rtol=0, atol=0)  # 3 groups a row
    torch.testing.assert_close(_mask(kernels, 9, 70, 7, 30000), big[:9, :70], rtol=0, atol=0)
    assert _mask(kernels, 50, 64, 7, 0).all()  # threshold 0: nothing dropped


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_keeps_each_element_with_probability_one_minus_p(kernels, p):
    threshold = round(p * 65536)
    keep = _mask(kernels, 1000, 1024, 99, threshold).double()
    kept = 1 - threshold / 65536
    assert abs(keep.mean().item() - kept) < 5e-3  # ~5 standard deviations at 1e6 draws
    groups = keep.view(1000, 32, 2, 16)  # the low and the high 16 bits of one random word feed the two halves
    for half in range(2):
        assert abs(groups[:, :, half].mean().item() - kept) < 1e-2
    assert abs((groups[:, :, 0] * groups[:, :, 1]).mean().item() - kept ** 2) < 5e-3  # halves of a word independent
    flat = keep.flatten()
    assert abs((flat[1:] * flat[:-1]).mean().item() - kept ** 2) < 5e-3  # neighbours independent
    assert abs((keep[1:] * keep[:-1]).mean().item() - kept ** 2) < 5e-3  # rows independent
    seeds = torch.stack([_mask(kernels, 4, 1024, s, threshold) for s in range(64)])
    assert abs((seeds[1:] * seeds[:-1]).mean().item() - kept ** 2) < 5e-3  # consecutive seeds independent
    assert abs((seeds[:, :, 1:] * seeds[:, :, :-1]).mean().item() - kept ** 2) < 5e-3


# ---- LoRA adapters ------------------------------------------------------------------------------------------
def _relative_error(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [0, 3277])
@pytest.mark.parametrize("tokens, k, n, r", [(37, 576, 1536, 8), (448, 1536, 576, 8), (5, 100, 70, 3),
                                             (9, 33, 17, 16), (1, 600, 40, 5)])
def test_lora_kernels_compute_the_adapter_and_its_gradients(kernels, dtype, threshold, tokens, k, n, r):
    """lora_down, lora_up_ and their backward passes against float64 products with the same mask: odd widths
    (partial vectors, tiles and mask groups), ranks and row counts that are not multiples of 4. On bf16 inputs with
    AVX512-BF16 (`bf16_dot`) the scaled factors and the thin results enter the products rounded to bf16, as in
    torch's bf16 products; the sums are fp32 either way."""
    x, dy = _seeded(20, tokens, k, dtype=dtype), _seeded(21, tokens, n, dtype=dtype)
    a, b = _seeded(22, r, k), _seeded(23, n, r)
    out0, gx0 = _seeded(24, tokens, n, dtype=dtype), _seeded(25, tokens, k, dtype=dtype)
    mask = _mask(kernels, tokens, k, 12345, threshold).double()
    xd = x.double() * mask
    dot = dtype == torch.bfloat16 and kernels.bf16_dot()
    as_used = (lambda t: t.bfloat16().double()) if dot else (lambda t: t.double())
    a64, b64 = as_used(a * 1.25), as_used(b * 0.5)  # with the scales each op takes
    summed = 2e-5  # fp32 sums of up to 1,536 terms, in any order (threads split the rows differently)
    stored = summed if dtype == torch.float32 else 8e-3  # bf16 outputs: rounded once (2^-8 relative at most)

    xa = kernels.lora_down(x, a, 1.25, 12345, threshold)
    assert xa.dtype == torch.float32 and xa.shape == (tokens, r)
    assert _relative_error(xa, xd @ a64.t()) < summed
    out = kernels.lora_up_(out0.clone(), xa, b, 0.5)
    assert out.dtype == dtype and _relative_error(out, out0.double() + as_used(xa) @ b64.t()) < stored
    dyb, grad_b = kernels.lora_up_backward(dy, xa, b, 0.5)
    assert _relative_error(dyb, dy.double() @ b64) < summed
    assert grad_b.shape == b.shape and _relative_error(grad_b, 0.5 * dy.double().t() @ as_used(xa)) < summed
    gx = gx0.clone()
    grad_a = kernels.lora_down_backward(x, a, dyb, 1.25, 12345, threshold, gx)
    assert _relative_error(grad_a, 1.25 * as_used(dyb).t() @ xd) < summed
    assert _relative_error(gx, gx0.double() + (as_used(dyb) @ a64) * mask) < stored
    assert torch.equal(kernels.lora_down_backward(x, a, dyb, 1.25, 12345, threshold, None), grad_a)  # no grad_x
    bf16_factors = kernels.lora_down(x, a.bfloat16(), 1.25, 12345, threshold)  # factors of any float dtype
    assert _relative_error(bf16_factors, xd @ as_used(a.bfloat16().double() * 1.25).t()) < summed


_PORTABLE_RUN = """
import sys, torch
torch.ops.load_library(sys.argv[1])
ops, g = torch.ops.martlet, torch.Generator().manual_seed(0)
out = {"mask": ops.dropout_mask(37, 91, 7, 3277)}
for dtype in (torch.bfloat16, torch.float32):
    x, dy = torch.randn(37, 91, generator=g).to(dtype), torch.randn(37, 70, generator=g).to(dtype)
    a, b = torch.randn(5, 91, generator=g), torch.randn(70, 5, generator=g)
    xa = ops.lora_down(x, a, 1.25, 7, 3277)
    up = ops.lora_up_(dy.clone(), xa, b, 0.5)
    dyb, grad_b = ops.lora_up_backward(dy, xa, b, 0.5)
    grad_x = x.clone()
    grad_a = ops.lora_down_backward(x, a, dyb, 1.25, 7, 3277, grad_x)
    out[str(dtype)] = dict(x=x, dy=dy, a=a, b=b, xa=xa, up=up, dyb=dyb, grad_b=grad_b, grad_a=grad_a, grad_x=grad_x)
    samples = torch.tensor([[0, 20, 0, 0], [20, 9, 0, 7], [29, 14, 0, 0]])  # the second continues the first's 7
    q, k, v, dout = (torch.randn(43 * h, 32, generator=g).to(dtype) for h in (6, 2, 2, 6))
    att, lse = ops.attention(q, k, v, samples, 6, 0.2)
    out["attention " + str(dtype)] = dict(q=q, k=k, v=v, dout=dout, out=att, lse=lse,
                                         grads=ops.attention_backward(dout, q, k, v, samples, att, lse, 6, 0.2))
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="builds for x86-64-v3 (AVX2)")
def test_the_generic_vector_code_computes_what_this_machine_s_build_computes(kernels, tmp_path, monkeypatch):
    """A machine without AVX-512 (AVX2 x86, ARM) compiles the kernels' generic vector code: built here for
    x86-64-v3 and run in a process of its own, it draws the same dropout mask and computes the same adapter
    products and gradients as this machine's build."""
    monkeypatch.setenv("MARTLET_CACHE", str(tmp_path))
    flags = [f if f != "-march=native" else "-march=x86-64-v3" for f in native.FLAGS]
    library = native.build(flags)
    subprocess.run([sys.executable, "-c", _PORTABLE_RUN, str(library), str(tmp_path / "out.pt")], check=True)
    portable = torch.load(tmp_path / "out.pt")
    assert torch.equal(portable["mask"], kernels.dropout_mask(37, 91, 7, 3277))
    for dtype in (torch.bfloat16, torch.float32):
        got = portable[str(dtype)]
        x, dy, a, b = got["x"], got["dy"], got["a"], got["b"]
        xa = kernels.lora_down(x, a, 1.25, 7, 3277)
        dyb, grad_b = kernels.lora_up_backward(dy, xa, b, 0.5)
        grad_x = x.clone()
        want = dict(xa=xa, up=kernels.lora_up_(dy.clone(), xa, b, 0.5), dyb=dyb, grad_b=grad_b,
                    grad_a=kernels.lora_down_backward(x, a, dyb, 1.25, 7, 3277, grad_x), grad_x=grad_x)
        for name, value in want.items():  # sums in another order: fp32 rounding, one bf16 step at most
            if dtype == torch.bfloat16 and kernels.bf16_dot():  # here the factors enter the products as bf16
                assert _relative_error(got[name], value.double()) < 8e-3, f"{dtype} {name}"
                continue
            close = dict(rtol=1e-5, atol=1e-5) if value.dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
            torch.testing.assert_close(got[name], value, **close, msg=f"{dtype} {name}")
        got = portable["attention " + str(dtype)]  # the fused attention: its products in blocks of 2 rows there
        samples = torch.tensor([[0, 20, 0, 0], [20, 9, 0, 7], [29, 14, 0, 0]])
        out, lse = kernels.attention(got["q"], got["k"], got["v"], samples, 6, 0.2)
        grads = kernels.attention_backward(got["dout"], got["q"], got["k"], got["v"], samples, got["out"], got["lse"],
                                           6, 0.2)
        close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
        for name, a, b in (("out", got["out"], out), ("lse", got["lse"], lse), *zip(("dq", "dk", "dv"), got["grads"], grads)):
            torch.testing.assert_close(a, b, **close, msg=f"attention {dtype} {name}")


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="no aarch64 cross compiler here (apt-get install g++-aarch64-linux-gnu)")
def test_the_kernels_compile_for_arm(tmp_path):
    """ARM (Graviton 3, Apple M2 and later: armv8.2-a with bf16): the kernels' source compiles to an aarch64 object
    with the build's own flags (no x86 code outside its guards). No ARM host here to run it on."""
    from torch.utils import cpp_extension

    flags = [f for f in native.FLAGS if f not in ("-march=native", "-shared")]
    command = ["aarch64-linux-gnu-g++", *flags, "-march=armv8.2-a+bf16", "-c", str(native.SOURCE),
               "-o", str(tmp_path / "martlet_native.o"), *(f"-I{path}" for path in cpp_extension.include_paths())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "martlet_native.o").read_bytes()[18:20] == (183).to_bytes(2, "little")  # e_machine: AArch64


def test_lora_kernels_give_the_same_bits_at_a_given_thread_count(kernels):
    """The factors' gradients are sums over rows split between threads: the same split, the same order."""
    x, dy = _seeded(30, 203, 96, dtype=torch.bfloat16), _seeded(31, 203, 80, dtype=torch.bfloat16)
    a, b = _seeded(32, 8, 96), _seeded(33, 80, 8)
    xa = kernels.lora_down(x, a, 1.0, 1, 3277)

    def grads():
        dyb, grad_b = kernels.lora_up_backward(dy, xa, b, 2.0)
        return grad_b, kernels.lora_down_backward(x, a, dyb, 1.0, 1, 3277, None)

    first = grads()
    for _ in range(3):
        assert all(torch.equal(g, f) for g, f in zip(grads(), first))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = grads()
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(one_thread, first):  # another split: the same sums up to fp32 rounding
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_lora_with_the_native_dropout_gives_autograd_s_gradients(kernels, with_bias, p):
    """The fused LoRA node (`LoraLinear`) with the kernels' dropout: output and gradients equal plain autograd
    with the same mask."""
    from martlet.train.kernels import LoraLinear, native_dropout

    x = _seeded(3, 2, 9, 16).requires_grad_()
    weight, bias = _seeded(4, 12, 16), _seeded(5, 12) if with_bias else None
    a, b = _seeded(6, 4, 16).requires_grad_(), _seeded(7, 12, 4).requires_grad_()
    torch.manual_seed(11)
    got = LoraLinear.apply(x, weight, bias, a, b, 2.0, p)
    torch.manual_seed(11)  # the seed the node drew, drawn again
    seed, threshold = native_dropout(p)
    mask = _mask(kernels, 18, 16, seed, threshold).view(x.shape)
    assert (p == 0) == bool(mask.all())
    want = x @ weight.t() + 2.0 * ((x * mask / (1 - threshold / 65536)) @ a.t()) @ b.t()
    want = want + bias if with_bias else want
    torch.testing.assert_close(got, want)
    upstream = _seeded(8, *want.shape)
    grads = torch.autograd.grad(got, (x, a, b), upstream, retain_graph=True)
    for g_got, g_want in zip(grads, torch.autograd.grad(want, (x, a, b), upstream, retain_graph=True)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)
    (only_a,) = torch.autograd.grad(got, (a,), upstream)  # one gradient asked for: the others are skipped
    torch.testing.assert_close(only_a, torch.autograd.grad(want, (a,), upstream)[0], rtol=1e-5, atol=1e-5)


# ---- RMSNorm and SwiGLU -------------------------------------------------------------------------------------
def _llama_norm(hidden, weight, eps):
    """transformers' own LlamaRMSNorm.forward, on these very tensors."""
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward(SimpleNamespace(weight=weight, variance_epsilon=eps), hidden)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_matches_llama(kernels, dtype, train_weight):
    x = (_seeded(9, 3, 17, 72) * 3).to(dtype).requires_grad_()
    weight = (1 + _seeded(10, 72) * 0.1).to(dtype).requires_grad_(train_weight)
    want = _llama_norm(x, weight, 1e-5)
    got = native.RMSNorm.apply(x, weight, 1e-5)
    exact = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)  # bf16: 1 ulp
    torch.testing.assert_close(got, want, **exact)
    inputs = (x, weight) if train_weight else (x,)
    upstream = _seeded(11, *x.shape, dtype=dtype)
    grads = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for g_got, g_want in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
        assert g_got.dtype == g_want.dtype
        torch.testing.assert_close(g_got, g_want, **grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_matches_silu_times_up(kernels, dtype):
    gate = (_seeded(12, 5, 33, 40) * 4).to(dtype).requires_grad_()  # wide range: the exp's reduction is exercised
    up = _seeded(13, 5, 33, 40, dtype=dtype).requires_grad_()
    gate.data[0, 0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    want = F.silu(gate) * up
    got = native.SwiGLU.apply(gate, up)
    tolerance = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got, want, **tolerance)
    upstream = _seeded(14, *gate.shape, dtype=dtype)
    for g_got, g_want in zip(torch.autograd.grad(got, (gate, up), upstream),
                             torch.autograd.grad(want, (gate, up), upstream)):
        torch.testing.assert_close(g_got, g_want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("angle_batch", [2, 1])  # 1: one row of positions for the whole batch
def test_rotary_matches_llama_bit_for_bit(kernels, dtype, angle_batch):
    """q and k as llama's attention makes them: (batch, heads, length, dim) views of the projections."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = _seeded(15, 2, 11, 6, 16, dtype=dtype).transpose(1, 2).requires_grad_()
    k = _seeded(16, 2, 11, 2, 16, dtype=dtype).transpose(1, 2).requires_grad_()
    angles = _seeded(17, angle_batch, 11, 8) * 3
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    assert native.rotary_usable(q, k, cos, sin)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = native.Rotary.apply(q, cos, sin), native.Rotary.apply(k, cos, sin)
    upstream = [_seeded(18 + i, *t.shape, dtype=dtype) for i, t in enumerate(want)]
    for g, w in zip(got + torch.autograd.grad(got, (q, k), upstream), want + torch.autograd.grad(want, (q, k), upstream)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_the_native_rotary_runs_only_inside_a_fused_attention_call(kernels, tiny_models, monkeypatch):
    """The modeling module's `apply_rotary_pos_emb` is replaced once (no swap per call); it runs the native kernel
    only while a fused attention's forward runs, also after that forward raised."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], use_cache=False)
    native.fuse_native(model)
    installed = modeling_llama.apply_rotary_pos_emb
    calls = []
    real = native.Rotary.apply
    monkeypatch.setattr(native.Rotary, "apply", lambda *a: calls.append(1) or real(*a))
    model(input_ids=torch.randint(5, 200, (1, 6)))
    assert len(calls) == 2 * model.config.num_hidden_layers  # q and k of every layer
    assert modeling_llama.apply_rotary_pos_emb is installed  # nothing reassigned during the call
    native.fuse_native(model)  # again: installed once
    assert modeling_llama.apply_rotary_pos_emb is installed

    q, k, cos, sin = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    calls.clear()
    outside = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)  # another model's call: the library's code
    assert not calls
    attention = model.model.layers[0].self_attn

    def fails(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(attention, "_plain_forward", fails)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=torch.randint(5, 200, (1, 6)))
    calls.clear()
    assert all(torch.equal(a, b) for a, b in zip(modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), outside))
    assert not calls  # the fused scope ended with the failed call


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_entropy_kernel_gives_the_loss_and_its_gradient(kernels, dtype):
    logits = (_seeded(20, 13, 3001) * 4).to(dtype)
    target = torch.randint(0, 3001, (13,), generator=torch.Generator().manual_seed(21))
    reference = logits.float().requires_grad_()
    want = F.cross_entropy(reference, target, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), reference)
    grad = logits.clone()
    got = kernels.cross_entropy_grad_(grad, target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, want_grad.to(dtype), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="outside"):
        kernels.cross_entropy_grad_(logits.clone(), torch.tensor([0] * 12 + [3001]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_scores_kernel_gives_trl_s_fields_and_the_gradient(kernels, dtype, grad, temperature):
    """Per row of logits divided by the temperature (in fp32): log p(target), entropy, mean logit, target == first
    arg max; with `grad` the logits become (softmax - one-hot) / temperature in place, without they stay. Row 3 has
    a tie at the top: the target is the second of the equal logits, so not the (first) arg max."""
    logits = (_seeded(30, 13, 3001) * 4).to(dtype)
    target = torch.randint(0, 3001, (13,), generator=torch.Generator().manual_seed(31))
    target[2] = int(logits[2].float().argmax())
    logits[3, 5] = logits[3, 9] = logits[3].max() + 1
    target[3] = 9
    z = logits.float() / temperature
    logp = z.log_softmax(-1)
    want = (logp.gather(1, target[:, None])[:, 0], -(logp.exp() * logp).sum(-1), z.mean(-1), z.argmax(-1) == target)
    work = logits.clone()
    got = kernels.token_scores_(work, target, grad, temperature)
    for name, g, w in zip(("logp", "entropy", "mean"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4, msg=name)
    assert got[3].tolist() == want[3].tolist() and bool(got[3][2]) and not bool(got[3][3])
    expected = ((logp.exp() - F.one_hot(target, 3001)) / temperature).to(dtype) if grad else logits
    torch.testing.assert_close(work, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_scores_native_and_torch_give_the_same_values_and_gradients(kernels, monkeypatch, temperature):
    """`kernels.TokenScores` (bf16, as under autocast): native kernel or torch code, the same log-probs and fields,
    and the same gradient of log-probs and entropy (the entropy's by recomputation, only when it is used), at
    temperature 1 and at a sampling temperature (GRPO's), against the formulas in fp32."""
    from martlet.train import kernels as kernel_module

    target = torch.randint(0, 500, (70,), generator=torch.Generator().manual_seed(34))
    upstream = _seeded(35, 70), _seeded(36, 70)

    def run(dtype):
        h = _seeded(32, 70, 16, dtype=dtype).requires_grad_()
        logp, entropy, mean, top1 = kernel_module.TokenScores.apply(h, _seeded(33, 500, 16, dtype=dtype), target, 32,
                                                                    temperature)
        (logp_only,) = torch.autograd.grad((logp * upstream[0]).sum(), h, retain_graph=True)
        (both,) = torch.autograd.grad((logp * upstream[0] + entropy * upstream[1]).sum(), h)
        return logp, entropy, mean, top1, logp_only, both

    native_runs = run(torch.bfloat16), run(torch.float32)
    monkeypatch.setattr(native, "usable", lambda *tensors: None)
    torch_runs = run(torch.bfloat16), run(torch.float32)
    names = ("logp", "entropy", "mean", "top1", "grad", "grad with entropy")
    for native_run, torch_run, tolerance in zip(native_runs, torch_runs, (2e-2, 1e-5)):
        for name, got, want in zip(names, native_run, torch_run):
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=name)
    h = _seeded(32, 70, 16).requires_grad_()  # the formulas, in fp32
    logp_all = (h @ _seeded(33, 500, 16).t() / temperature).log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    objective = logp_all.gather(1, target[:, None])[:, 0] * upstream[0] + entropy * upstream[1]
    (want,) = torch.autograd.grad(objective.sum(), h)
    torch.testing.assert_close(torch_runs[1][5], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("length", [1, 7, 40])
def test_causal_softmax_matches_the_masked_softmax(kernels, dtype, length):
    """Two key/value heads, three query heads each, stacked: row r is query position r % length."""
    scores = (_seeded(22, 2, 3 * length, length) * 5).to(dtype).requires_grad_()
    future = torch.ones(length, length, dtype=torch.bool).triu_(1).repeat(3, 1)
    want = (scores * 0.125).masked_fill(future, float("-inf")).softmax(-1, dtype=torch.float32).to(dtype)
    got = native.CausalSoftmax.apply(scores, 0.125)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=2e-3)
    torch.testing.assert_close(got, want, **tolerance)
    assert torch.all(got.masked_select(future) == 0)
    upstream = _seeded(23, *scores.shape, dtype=dtype)
    (g_got,), (g_want,) = torch.autograd.grad(got, scores, upstream), torch.autograd.grad(want, scores, upstream)
    torch.testing.assert_close(g_got, g_want, **(tolerance if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))


# ---- fused attention ------------------------------------------------------------------------------------------
def _each_sequence_alone(q, k, v, sequences, scale):
    """fp64 attention of each sequence on its own (q (T, H, D), k/v (T, KV, D)); a token's output is the first
    sequence's that holds it (a trunk's own), as in the row."""
    out, done = torch.zeros_like(q), set()
    groups = q.shape[1] // k.shape[1]
    for tokens in sequences:
        index = torch.tensor(tokens)
        qq, kk, vv = q[index], k[index].repeat_interleave(groups, 1), v[index].repeat_interleave(groups, 1)
        scores = torch.einsum("ihd,jhd->hij", qq, kk) * scale
        scores = scores.masked_fill(torch.ones(len(tokens), len(tokens), dtype=torch.bool).triu(1), float("-inf"))
        each = torch.einsum("hij,jhd->ihd", scores.softmax(-1), vv)
        for j, t in enumerate(tokens):
            if t not in done:
                done.add(t)
                out[t] = each[j]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 2, 16), (5, 5, 80)])
def test_fused_attention_gives_each_sequence_its_own_attention_and_gradients(kernels, dtype, heads, kv_heads, dim):
    """Trunks with branches after shared prefixes, lone samples, a one-token sample: the output and the gradients
    of q, k and v are those of each whole sequence attending alone (computed in fp64 on the same inputs), the shared
    tokens' key/value gradients summing what every sequence sends them."""
    from martlet.train.varlen_attention import row_samples

    position_ids, sequences = shared_prefix_row([(11, [26, 20, 5]), (0, [70]), (30, [14, 44]), (0, [1]), (0, [9])])
    samples = torch.tensor([[s.start, s.length, s.prefix_start, s.prefix] for s in row_samples(position_ids)])
    tokens, scale = position_ids.shape[1], dim ** -0.5
    q, k, v, upstream = (_seeded(40 + i, tokens, h, dim, dtype=dtype) for i, h in
                         enumerate((heads, kv_heads, kv_heads, heads)))
    inputs = [t.reshape(-1, dim).clone().requires_grad_() for t in (q, k, v)]
    got = native.Attention.apply(*inputs, samples, heads, scale)
    got.backward(upstream.reshape(-1, dim))
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    want = _each_sequence_alone(*wide, sequences, scale)
    want.backward(upstream.double())
    # fp32: summation order; bf16: the outputs' and gradients' own rounding, and with AVX512-BF16 P and dS rounded to
    # bf16 where they enter a product (the sums run in fp32)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().view(want.shape), want, **tolerance)
    for name, a, b in zip("qkv", inputs, wide):
        torch.testing.assert_close(a.grad.double().view(b.shape), b.grad, **tolerance, msg=f"grad {name}")
    if dtype == torch.bfloat16:  # on the whole, within a few bf16 steps of the largest value
        for name, a, b in (("out", got, want), *zip("qkv", (t.grad for t in inputs), (t.grad for t in wide))):
            assert _relative_error(a.view(b.shape), b) < 8e-3, name


def test_fused_attention_gives_the_same_bits_at_any_thread_count(kernels):
    """The tasks go to the threads in any order, and a shared prefix's gradients are summed after them in row
    order: one thread and two give the same bits."""
    from martlet.train.varlen_attention import row_samples

    position_ids, _ = shared_prefix_row([(9, [30, 12, 40, 7]), (0, [50]), (5, [5, 6])])
    samples = torch.tensor([[s.start, s.length, s.prefix_start, s.prefix] for s in row_samples(position_ids)])
    tokens = position_ids.shape[1]
    q, k, v, dout = (_seeded(50 + i, tokens * h, 32, dtype=torch.bfloat16) for i, h in enumerate((6, 2, 2, 6)))
    threads, results = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out, lse = kernels.attention(q, k, v, samples, 6, 0.125)
            results.append((out, lse, *kernels.attention_backward(dout, q, k, v, samples, out, lse, 6, 0.125)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fused_attention_refuses_samples_that_do_not_tile_the_row(kernels):
    q, k = torch.randn(10 * 4, 16), torch.randn(10 * 2, 16)
    with pytest.raises(RuntimeError, match="the samples hold 8 tokens, the row 10"):
        kernels.attention(q, k, k, torch.tensor([[0, 5, 0, 0], [5, 3, 0, 2]]), 4, 0.25)
    with pytest.raises(RuntimeError, match="does not follow"):
        kernels.attention(q, k, k, torch.tensor([[0, 5, 0, 0], [6, 4, 0, 0]]), 4, 0.25)
    with pytest.raises(RuntimeError, match="reads past the row"):
        kernels.attention(q, k, k, torch.tensor([[0, 5, 0, 0], [5, 5, 8, 4]]), 4, 0.25)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.attention(torch.randn(40, 8), torch.randn(20, 8), torch.randn(20, 8),
                          torch.tensor([[0, 10, 0, 0]]), 4, 0.25)


@pytest.mark.parametrize("fused", ["1", "0"])
def test_varlen_attention_runs_the_fused_pass_where_it_can_and_the_buckets_elsewhere(kernels, monkeypatch, fused):
    """With the kernels, a row of short samples (bf16 or fp32, head size a multiple of 16) takes the fused pass, and
    so does a bf16 row of longer ones when they make enough tasks for the threads or the build has AVX512-BF16;
    MARTLET_FUSED_ATTENTION=0, a head
    size of 8 or a sample past FUSED_MAX_LEN keys take the batched products of the buckets; each gives the whole
    sequences' attention."""
    from martlet.train import varlen_attention

    monkeypatch.setenv("MARTLET_FUSED_ATTENTION", fused)
    calls = []
    real = native.Attention.apply
    monkeypatch.setattr(native.Attention, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    position_ids, sequences = shared_prefix_row([(6, [20, 9]), (0, [33])])
    module = types.SimpleNamespace(training=True, is_causal=True)
    for dim, runs in ((16, fused == "1"), (8, False)):
        calls.clear()
        q, k, v = (_seeded(60 + i, 1, position_ids.shape[1], h, dim).transpose(1, 2) for i, h in enumerate((4, 2, 2)))
        got, _ = varlen_attention.varlen_attention(module, q, k, v, None, position_ids=position_ids)
        want = _each_sequence_alone(*(t[0].transpose(0, 1).double() for t in (q, k, v)), sequences, dim ** -0.5)
        torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-5)
        assert bool(calls) == runs, (dim, fused)
    if fused == "1":  # bf16: a row of few long samples stays in the buckets (too few tasks for the threads), unless
        # the build's bf16 products run on AVX512-BF16 pairs
        pairs = native.ops().bf16_dot()
        for lengths, runs in (((300,), pairs), ((150,), True), ((300,) * (2 * torch.get_num_threads()), True)):
            calls.clear()
            position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
            q, k, v = (_seeded(80 + i, 1, sum(lengths), h, 16, dtype=torch.bfloat16).transpose(1, 2)
                       for i, h in enumerate((4, 2, 2)))
            varlen_attention.varlen_attention(module, q, k, v, None, position_ids=position_ids)
            assert bool(calls) == runs, lengths
        position_ids, sequences = shared_prefix_row([(6, [20, 9]), (0, [33])])
    monkeypatch.setattr(varlen_attention, "FUSED_MAX_LEN", 20)
    calls.clear()
    q, k, v = (_seeded(70 + i, 1, position_ids.shape[1], h, 16).transpose(1, 2) for i, h in enumerate((4, 2, 2)))
    varlen_attention.varlen_attention(module, q, k, v, None, position_ids=position_ids)
    assert not calls


def test_varlen_attention_under_autocast_takes_q_k_and_v_of_different_dtypes(kernels, monkeypatch):
    """Full training under bf16 autocast (`martlet sft --sft_type full` on a CPU with bf16): fp32 weights make bf16
    q, k and v, and the fp32 rotary angles make q and k fp32 again. The fused pass runs them in autocast's dtype, as
    the buckets' products (autocast casts their inputs) and sdpa do: it raised on the mixed dtypes."""
    from martlet.train import varlen_attention

    position_ids, sequences = shared_prefix_row([(6, [20, 9]), (0, [33])])
    module = types.SimpleNamespace(training=True, is_causal=True)
    q, k = (_seeded(90 + i, 1, position_ids.shape[1], h, 16).transpose(1, 2) for i, h in enumerate((4, 2)))
    v = _seeded(92, 1, position_ids.shape[1], 2, 16).to(torch.bfloat16).transpose(1, 2)
    calls = []
    real = native.Attention.apply
    monkeypatch.setattr(native.Attention, "apply", lambda *a: calls.append(a[0].dtype) or real(*a))
    results = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("MARTLET_FUSED_ATTENTION", fused)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = varlen_attention.varlen_attention(module, *leaves, None, position_ids=position_ids)
        out.float().square().sum().backward()
        results[fused] = out, [t.grad for t in leaves]
    assert calls == [torch.bfloat16]  # the fused pass ran, once, in autocast's dtype
    (got, got_grads), (want, want_grads) = results["1"], results["0"]
    assert got.dtype == want.dtype == torch.bfloat16
    reference = _each_sequence_alone(*(t[0].transpose(0, 1).double() for t in (q, k, v)), sequences, 16 ** -0.5)
    for out in (got, want):  # each within bf16's rounding of the whole sequences' attention
        torch.testing.assert_close(out[0].double(), reference, rtol=2e-2, atol=2e-2)
    for name, a, b in zip("qkv", got_grads, want_grads):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.double(), b.double(), rtol=5e-2, atol=5e-2, msg=f"grad {name}")


# ---- models -------------------------------------------------------------------------------------------------
def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,expected", [("llama", 5 + 2 + 2), ("qwen2", 5 + 2 + 2), ("gemma", 2)])
def test_fuse_native_gives_the_model_s_values_and_gradients(kernels, tiny_models, arch, expected):
    """Full fine-tuning in fp32 (every weight, norms included, gets a gradient). Two layers: 5 norms, 2 MLPs, 2
    attentions (rotary). Gemma's norm adds 1 to its weight and its MLP uses GELU: only its rotary is native."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    plain = AutoModelForCausalLM.from_pretrained(tiny_models[arch], use_cache=False)
    fused = AutoModelForCausalLM.from_pretrained(tiny_models[arch], use_cache=False)
    assert native.fuse_native(fused) == expected
    want_loss, want = _loss_and_grads(plain, batch)
    got_loss, got = _loss_and_grads(fused, batch)
    torch.testing.assert_close(got_loss, want_loss)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fuse_native_under_lora_and_bf16_autocast(kernels, tiny_models):
    """As `martlet sft` trains LoRA on a CPU: bf16 base weights, fp32 adapters, bf16 autocast."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from martlet.train.kernels import fuse_lora

    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for fuse in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16, use_cache=False)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        if fuse:
            fuse_lora(model)
            assert native.fuse_native(model) > 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(model.train(), {"input_ids": ids, "labels": ids}))
    (want_loss, want), (got_loss, got) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-2, atol=1e-2)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=5e-2, atol=5e-3, msg=name)


def test_fused_modules_stay_fused_through_train_and_eval(kernels, tiny_models, monkeypatch):
    """transformers 5.25 deletes instance `forward` attributes of its hub-kernel layers (RMSNorm) at `model.train()`:
    the Trainer calls it before every step, and an instance-only patch ran the torch RMSNorm in every step since.
    Every fused module still runs its kernel after train() and eval(), and fusing twice changes nothing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], use_cache=False)
    fused = native.fuse_native(model)
    assert fused == 5 + 2 + 2 and native.fuse_native(model) == fused
    calls = {"norm": 0, "mlp": 0, "rotary": 0}
    for key, cls in (("norm", native.RMSNorm), ("mlp", native.SwiGLU), ("rotary", native.Rotary)):
        def counted(*args, key=key, apply=cls.apply):
            calls[key] += 1
            return apply(*args)
        monkeypatch.setattr(cls, "apply", counted)
    ids = torch.randint(5, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    for mode in (model.train, model.eval, model.train):
        mode()
        calls.update(norm=0, mlp=0, rotary=0)
        model(input_ids=ids, labels=ids).loss.backward()
        assert calls == {"norm": 5, "mlp": 2, "rotary": 2 * 2}, mode.__name__
    norm = model.model.norm
    assert type(norm).__name__ == "LlamaRMSNorm" and isinstance(norm, type(model.model.layers[0].input_layernorm))


def _tiny_module(kind, name):
    """An instance of a registered transformers class, built from a tiny config of its family."""
    import importlib

    from transformers import AutoConfig

    prefix = name[: -len(kind)]
    family = {"Llama": "llama", "Qwen2": "qwen2", "Qwen3": "qwen3", "Mistral": "mistral", "Granite": "granite",
              "Qwen2Moe": "qwen2_moe", "Qwen3Moe": "qwen3_moe", "DeepseekV3": "deepseek_v3", "Phi3": "phi3",
              "Gemma": "gemma", "Gemma2": "gemma2", "Olmo2": "olmo2"}[prefix]
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if kind == "RMSNorm":
        norm = getattr(module, name)(8, eps=1e-6)
        torch.nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(3))
        return norm, module
    config = AutoConfig.for_model(family, hidden_size=8, intermediate_size=16, moe_intermediate_size=16,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=4, hidden_act="silu",
                                  hidden_activation="silu")
    return (getattr(module, name)(config) if kind == "MLP" else None), module


def test_the_registered_classes_compute_what_llama_computes():
    """fuse_native picks modules by class name; each patch's guard checks, by a reference computation on a tiny
    input, that the class (or its module's rotary function) computes llama's formula. Every registered class passes
    it on the locked transformers; a class that computes something else does not."""
    from transformers.models.llama import modeling_llama

    from martlet import patches

    class Shifted(modeling_llama.LlamaRMSNorm):  # llama's attributes, another result
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1

    for names, kind, patch in ((native.LLAMA_RMS_NORMS, "RMSNorm", "native_rms_norm"),
                               (native.LLAMA_MLPS, "MLP", "native_mlp"),
                               (native.LLAMA_ROTARY_ATTENTIONS, "Attention", "native_rotary")):
        for name in names:
            instance, module = _tiny_module(kind, name)
            target = module if kind == "Attention" else instance
            patches.PATCHES[patch].guard(target)  # raises Mismatch, naming what differs
    with pytest.raises(patches.Mismatch, match="Shifted.forward computes something else"):
        patches.PATCHES["native_rms_norm"].guard(Shifted(8))
    with pytest.raises(patches.Mismatch, match="variance_epsilon"):  # Gemma's norm: 1 + weight, another field
        patches.PATCHES["native_rms_norm"].guard(_tiny_module("RMSNorm", "GemmaRMSNorm")[0])


def test_under_torch_compile_the_torch_code_is_traced(kernels, tiny_models):
    """torch.compile (`--torch_compile true`) traces the plain torch code: same loss and gradients as eager."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from martlet.train.kernels import fuse_lora

    ids = torch.randint(5, 200, (1, 10), generator=torch.Generator().manual_seed(3))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], use_cache=False)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        fuse_lora(model)
        native.fuse_native(model)
        run = torch.compile(model, backend="eager", fullgraph=False) if compiled else model
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ---- when the kernels cannot run ----------------------------------------------------------------------------
def test_without_the_kernels_the_torch_path_runs(monkeypatch, tiny_models):
    from transformers import AutoModelForCausalLM

    from martlet.train.kernels import LoraLinear

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("MARTLET_NATIVE", "0")
    assert native.ops() is None and native.usable(torch.ones(3)) is None
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], use_cache=False)
    assert native.fuse_native(model) > 0  # swapped, but each call falls through to the module's own forward
    ids = torch.randint(5, 200, (1, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    x = torch.randn(4, 6, requires_grad=True)
    out = LoraLinear.apply(x, torch.randn(5, 6), None, torch.randn(2, 6, requires_grad=True),
                           torch.randn(5, 2, requires_grad=True), 1.0, 0.5)
    out.sum().backward()  # the 0/1 factor tensor path
    assert torch.isfinite(x.grad).all()


def test_a_failing_compiler_costs_speed_not_the_run(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("MARTLET_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING, logger="martlet"):
        assert native.ops() is None
    assert "native CPU kernels unavailable" in caplog.text and "false failed" in caplog.text
    assert not list((tmp_path / "native").iterdir())  # no partial library left to be mistaken for a whole one
    assert native.usable(torch.ones(3)) is None


def test_the_library_is_built_once_and_named_by_what_it_was_built_from(kernels):
    from martlet.models.embedded import cache_dir

    library = native.build()  # the cached one: no second compile
    assert library.parent.resolve() == (native.Path(cache_dir()) / "native").resolve()
    assert library.exists() and library.name.startswith("martlet_native-")
    assert not [p for p in library.parent.iterdir() if p.name.endswith(".partial")]


def test_another_source_builds_its_own_library_from_that_source(monkeypatch, tmp_path):
    """`build(source=...)` (benchmarks/step_ab.py --compare native builds an earlier revision's kernels beside this
    tree's): that file compiled, under a name of its own, once."""
    compiler = tmp_path / "fake-cxx"
    log = tmp_path / "calls"
    compiler.write_text(f'#!/bin/sh\necho "$@" >> {log}\nwhile [ "$1" != "-o" ]; do shift; done\necho built > "$2"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("MARTLET_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other.cpp"
    other.write_text("// another revision's kernels\n")
    ours, theirs = native.build(), native.build(source=other)
    assert ours != theirs and ours.exists() and theirs.exists()
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and str(native.SOURCE) in calls[0] and str(other) in calls[1]
    assert native.build(source=other) == theirs and len(log.read_text().splitlines()) == 2  # cached: no compile
    other.write_text("// changed\n")
    assert native.build(source=other) != theirs  # named by its text


def test_the_kernel_path_says_which_code_runs(monkeypatch):
    """What benchmarks/sft_throughput.py prints: the CPU features the kernels depend on and the path taken."""
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")  # (the lines below are an x86 CPU's, wherever this runs)
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile")
    assert native.cpu_features() == ["avx2", "avx512f", "avx512_bf16", "amx_tile"]
    built = types.SimpleNamespace(bf16_dot=lambda: True)
    monkeypatch.setattr(native, "ops", lambda: built)
    assert native.kernel_path() == "native, AVX-512 with AVX512-BF16 (vcvtneps2bf16; LoRA and attention products on vdpbf16ps)"
    built.bf16_dot = lambda: False  # a build without the dot products (an older compiler)
    assert native.kernel_path() == "native, AVX-512 with AVX512-BF16 (vcvtneps2bf16)"
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t\t: fpu sse2 avx2")
    assert native.kernel_path() == "native, generic vectors (AVX2)"
    monkeypatch.setattr(native, "_cpu_flags", lambda: "Features\t: fp asimd sve")
    assert native.cpu_features() == []  # an ARM line read by an x86 process: not this CPU's
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert native.cpu_features() == ["asimd", "sve"] and native.kernel_path() == "native, generic vectors (aarch64)"
    monkeypatch.setattr(native, "ops", lambda: None)
    assert native.kernel_path().startswith("plain torch")


def test_an_avx2_or_avx512_cpu_can_be_emulated(monkeypatch):
    """MARTLET_CPU_ISA=avx2 (benchmarks/sft_throughput.py --cpu_isa avx2): built for x86-64-v3, reported without
    AVX-512 or AMX, and `--dtype AUTO` trains in fp32 as on such a laptop; avx512 the same for x86-64-v4 (AVX-512
    without AVX512-BF16 or AMX)."""
    from martlet.models import dtype

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16")
    monkeypatch.delenv("MARTLET_CPU_BF16", raising=False)
    monkeypatch.setenv("MARTLET_CPU_ISA", "avx2")
    dtype.cpu_has_bf16.cache_clear()
    try:
        assert native.cpu_features() == ["avx2"]
        assert "-march=x86-64-v3" in native.compile_flags() and "-march=native" not in native.compile_flags()
        assert not dtype.cpu_has_bf16() and dtype.resolve_dtype("AUTO", "cpu") == "fp32"
        monkeypatch.setattr(native, "ops", lambda: object())
        assert native.kernel_path() == "native, generic vectors (AVX2) (emulated: MARTLET_CPU_ISA)"
        monkeypatch.setenv("MARTLET_CPU_ISA", "avx512")  # AVX-512 without BF16 or AMX (a Skylake-SP Xeon)
        assert native.cpu_features() == ["avx2", "avx512f"]
        assert "-march=x86-64-v4" in native.compile_flags() and "-march=native" not in native.compile_flags()
        assert not dtype.cpu_has_bf16() and dtype.resolve_dtype("AUTO", "cpu") == "fp32"
        assert native.kernel_path() == "native, AVX-512 (emulated: MARTLET_CPU_ISA)"
        monkeypatch.setenv("MARTLET_CPU_ISA", "avx1")
        with pytest.raises(ValueError, match="avx2, avx512"):
            native.compile_flags()
        monkeypatch.setenv("MARTLET_CPU_ISA", "native")
        assert native.compile_flags() == native.FLAGS and "avx512f" in native.cpu_features()
    finally:
        dtype.cpu_has_bf16.cache_clear()


def test_an_arm_process_on_an_x86_host_is_not_taken_for_an_x86_cpu(monkeypatch):
    """An aarch64 process emulated on an x86 host (qemu-user, a multi-arch container) reads the host's /proc/cpuinfo,
    whose `flags` line lists AVX-512: its kernels would be built for ARM and must not be taken for the AVX-512 path,
    nor its `--dtype AUTO` for bf16."""
    from martlet.models import dtype

    host = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16"
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "_cpu_flags", lambda: host)
    monkeypatch.setattr(dtype, "cpuinfo_features", lambda: host)
    monkeypatch.delenv("MARTLET_CPU_BF16", raising=False)
    monkeypatch.delenv("MARTLET_CPU_ISA", raising=False)
    monkeypatch.delenv("MARTLET_NATIVE", raising=False)
    dtype.cpu_has_bf16.cache_clear()
    try:
        assert native.cpu_features() == ["avx2", "avx512f", "avx512_bf16", "amx_bf16"] and dtype.cpu_has_bf16()
        monkeypatch.setattr(platform, "machine", lambda: "aarch64")
        dtype.cpu_has_bf16.cache_clear()
        assert native.cpu_features() == [] and not native.wanted() and not native.attention_wanted()
        assert not dtype.cpu_has_bf16() and dtype.resolve_dtype("AUTO", "cpu") == "fp32"
    finally:
        dtype.cpu_has_bf16.cache_clear()


@pytest.mark.parametrize("setting, flags, wanted, attention", [
    (None, "flags\t\t: fpu avx2 avx512f avx512_bf16", True, True),  # measured faster: on by default
    (None, "flags\t\t: fpu avx2 fma", False, True),  # AVX2 alone: the fused attention only (the rest was slower)
    (None, "Features\t: fp asimd sve", False, False),  # ARM: unmeasured, off by default
    ("1", "flags\t\t: fpu avx2 fma", True, True),  # forced on
    ("0", "flags\t\t: fpu avx2 avx512f", False, False),  # forced off
    ("Off", "flags\t\t: fpu avx2 avx512f", False, False),  # (utils.env_switch's words)
    ("yes", "flags\t\t: fpu avx2 fma", True, True),
])
def test_the_kernels_run_by_default_only_where_they_are_faster(kernels, monkeypatch, setting, flags, wanted, attention):
    (built,) = native._LIBRARIES  # this machine's build, loaded (the fake CPU's would be built anew)
    monkeypatch.setattr(native, "build", lambda flags=None: built)
    monkeypatch.setattr(native, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64" if flags.startswith("Features") else "x86_64")
    monkeypatch.delenv("MARTLET_CPU_ISA", raising=False)
    if setting is None:
        monkeypatch.delenv("MARTLET_NATIVE", raising=False)
    else:
        monkeypatch.setenv("MARTLET_NATIVE", setting)
    assert native.wanted() is wanted and native.attention_wanted() is attention
    monkeypatch.setattr(native, "_loaded", {})
    if not attention:
        assert native.ops() is None and native.kernel_path().startswith("plain torch")
        default = "unmeasured on ARM" if flags.startswith("Features") else "AVX-512 CPUs only"
        assert (default in native.kernel_path()) is (setting is None)
    elif not wanted:  # loaded for the attention alone: every other kernel says it cannot run
        assert native.ops() is not None and native.attention_only()
        assert native.usable(torch.ones(4, 4)) is None
        assert native.kernel_path().startswith("plain torch, but the attention's fused native pass (generic vectors")
    else:
        assert not native.attention_only() and native.usable(torch.ones(4, 4)) is native.ops()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_rows_is_a_gather_with_zero_rows_past_the_end(kernels, dtype):
    """`gather_rows(src, index)`: row index[i] of src, zero where index[i] is one past the last row, as
    `cat([src, zero row]).index_select(0, index)` (the attention buckets' gradient gathers); rows repeated, any
    order; an index outside [0, rows] is an error, not a read past the tensor."""
    src = _seeded(40, 37, 64, dtype=dtype)
    index = torch.randint(0, 38, (500,), generator=torch.Generator().manual_seed(41))
    index[:3] = torch.tensor([37, 0, 36])
    want = torch.cat([src, src.new_zeros(1, 64)]).index_select(0, index)
    assert torch.equal(kernels.gather_rows(src, index), want)
    with pytest.raises(RuntimeError, match="outside"):
        kernels.gather_rows(src, torch.tensor([38]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_lora_layer_s_cpp_node_gives_its_python_node_s_bits(kernels, monkeypatch, dtype, bias, dropout):
    """On a packed base weight a fused LoRA layer runs as one C++ op with its autograd node in C++
    (`martlet::lora_linear`): the output and the gradients of x, A and B are `LoraLinear`'s to the bit, the dropout
    drawn from the same seed; with x needing no gradient (a first layer) too."""
    from martlet.train import packed
    from martlet.train.kernels import LoraLinear, _lora_linear

    monkeypatch.setattr(native, "usable", lambda *tensors: kernels)  # (whatever this CPU's default: both native)
    base = torch.nn.Linear(64, 96, bias=bias).to(dtype).requires_grad_(False)
    base.weight._martlet_packed = packed.PackedWeight.of(base.weight)
    a = (_seeded(1, 8, 64) * 0.1).requires_grad_()
    b = (_seeded(2, 96, 8) * 0.1).requires_grad_()
    grad = _seeded(3, 2, 37, 96, dtype=dtype)
    for needs_x in (True, False):
        def run(layer):
            a.grad = b.grad = None
            x = _seeded(4, 2, 37, 64, dtype=dtype).requires_grad_(needs_x)
            torch.manual_seed(5)
            y = layer(x)
            y.backward(grad)
            return y, x.grad, a.grad, b.grad

        want = run(lambda x: LoraLinear.apply(x, base.weight, base.bias, a, b, 4.0, dropout))
        got = run(lambda x: _lora_linear(x, base, a, b, 4.0, dropout))
        assert "LoraLinearNode" in got[0].grad_fn.name() and "LoraLinear" in want[0].grad_fn.name()
        assert got[0].shape == (2, 37, 96) and (got[1] is None) == (not needs_x)
        for g, w in zip(got, want):
            assert (g is None and w is None) or torch.equal(g, w)

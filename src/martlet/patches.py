"""Every place where Martlet changes how a third-party library behaves: one registry, each entry guarded.

An entry (`Patch`) says what it changes and why, with the gain it was measured to give, and the library versions
it was checked against. Its guard looks at the target when the patch is about to be applied: a signature, the
attributes the patch reads, or a reference computation on a tiny input (never the library's source text). When
the target no longer has the expected shape, the library's own code runs and one warning names the patch, the
library and its installed version: a new release can cost speed, never give other numbers. Where a patch has no
library code to fall back to (Martlet's rows replace trl's tokenization), a failed guard stops the run with an
error that says which version to install.

The assignments to other libraries' objects are all here: `patch_forward` (one module instance's forward),
`patch_global` (a module global, replaced once by a function that hands every call it does not take to the
original; never swapped on a hot path), `patch_attribute` (a documented attribute of a library's layer) and
`patch_environment`. The code they install lives beside its feature (`train/native.py`, `train/kernels.py`,
`train/rlhf_trainers.py`); subclass hooks (`_save_checkpoint`, `_prepare_dataset`) ask `usable` / `require`.
tests/unit/test_patches.py checks each patch against the unpatched library and each guard's fallback.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterator

from martlet.errors import MartletError

logger = logging.getLogger("martlet")


class Mismatch(Exception):
    """A guard's finding: the target no longer has the shape the patch was written for."""


def expect(condition: bool, why: str) -> None:
    if not condition:
        raise Mismatch(why)


def expect_parameters(function: Any, names: tuple[str, ...], what: str) -> None:
    """The function's parameters (after self) are `names` (a hook Martlet overrides or calls with exactly those)."""
    try:
        parameters = tuple(p for p in inspect.signature(function).parameters if p != "self")
    except (TypeError, ValueError):
        raise Mismatch(f"{what} has no readable signature") from None
    expect(parameters == names, f"{what} takes {parameters}, expected {names}")


def expect_close(got: Any, want: Any, what: str, tolerance: float = 1e-5) -> None:
    import torch

    expect(torch.is_tensor(got) and got.shape == want.shape, f"{what} gives another shape")
    expect(torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance),
           f"{what} computes something else on a tiny input")


@contextlib.contextmanager
def _probing(module: Any) -> Iterator[Callable[..., Any]]:
    """Run a module on a tiny input: eval mode (no dropout), no gradients, autocast to its half weights' dtype;
    yields a function that makes a seeded input of a given shape on the module's device."""
    import torch

    weight = next(module.parameters())
    dtype, device = weight.dtype, weight.device
    training = module.training
    generator = torch.Generator().manual_seed(0)
    module.train(False)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            yield lambda *shape: torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    finally:
        module.train(training)


def _tolerance(module: Any) -> float:
    import torch

    return 1e-5 if next(module.parameters()).dtype == torch.float32 else 3e-2


def guard_rms_norm(module: Any) -> None:
    """llama's RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), the statistics in fp32."""
    import torch

    expect(hasattr(module, "weight") and hasattr(module, "variance_epsilon"), "no weight / variance_epsilon")
    with _probing(module) as tiny:
        x = tiny(3, module.weight.shape[-1]).float()  # fp32 in: the formula's own precision
        want = module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))
        expect_close(module(x), want, f"{type(module).__name__}.forward", _tolerance(module))


def guard_mlp(module: Any) -> None:
    """A SiLU-gated MLP: down(silu(gate(x)) * up(x))."""
    import torch

    expect(all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")),
           "no gate_proj / up_proj / down_proj / act_fn")
    with _probing(module) as tiny:
        x = tiny(1, 3, module.gate_proj.in_features)
        want = module.down_proj(torch.nn.functional.silu(module.gate_proj(x)) * module.up_proj(x))
        expect_close(module(x), want, f"{type(module).__name__}.forward", _tolerance(module))


def guard_rotary(library: Any) -> None:
    """The modeling module's `apply_rotary_pos_emb` is llama's: x * cos + rotate_half(x) * sin, cos and sin
    unsqueezed at dim 1."""
    import torch

    function = getattr(library, "apply_rotary_pos_emb", None)
    expect(callable(function), f"{library.__name__} has no apply_rotary_pos_emb")
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 4, generator=generator), torch.randn(1, 1, 3, 4, generator=generator)
    cos, sin = torch.randn(1, 3, 4, generator=generator), torch.randn(1, 3, 4, generator=generator)
    try:
        got = function(q, k, cos, sin)
    except Exception as error:  # noqa: BLE001 - any failure means the shape changed
        raise Mismatch(f"apply_rotary_pos_emb(q, k, cos, sin) raised {type(error).__name__}") from None
    expect(isinstance(got, tuple) and len(got) == 2, "apply_rotary_pos_emb does not return (q, k)")
    expect_close(got[0], _rotated(q, cos, sin), "apply_rotary_pos_emb")
    expect_close(got[1], _rotated(k, cos, sin), "apply_rotary_pos_emb")


def _rotated(x: Any, cos: Any, sin: Any) -> Any:
    """llama's rotary embedding of x (batch, heads, length, dim): x * cos + rotate_half(x) * sin, cos and sin
    (batch, length, dim) unsqueezed at dim 1."""
    import torch

    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]


def guard_decoder_layer(module: Any) -> None:
    """A llama decoder layer: x2 = x + o(causal attention of rotary q(n1), rotary k(n1), v(n1)), n1 = norm1(x), the
    query heads grouped on the key/value heads; y = x2 + mlp(norm2(x2)). Its parts' own forwards are used (each has
    its own guard), so this checks how the layer puts them together."""
    import torch

    parts = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    expect(all(hasattr(module, name) for name in parts), f"{type(module).__name__} has no {' / '.join(parts)}")
    attention = module.self_attn
    needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config")
    expect(all(hasattr(attention, name) for name in needed), f"its attention has no {' / '.join(needed)}")
    config = attention.config
    with _probing(module) as tiny:
        x = tiny(1, 5, config.hidden_size)
        angles = tiny(1, 5, attention.head_dim // 2).float()
        cos, sin = (torch.cat((f(angles), f(angles)), -1).to(x.dtype) for f in (torch.cos, torch.sin))
        positions = torch.arange(5, device=x.device)[None]
        try:
            got = module(x, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
        except Exception as error:  # noqa: BLE001 - any failure means the call changed
            raise Mismatch(f"{type(module).__name__}(x, position_ids=, position_embeddings=) raised "
                           f"{type(error).__name__}") from None
        expect_close(got, _llama_layer(module, x, cos, sin), f"{type(module).__name__}.forward", _tolerance(module))


def _llama_layer(module: Any, x: Any, cos: Any, sin: Any) -> Any:
    import torch

    attention, config = module.self_attn, module.self_attn.config
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
    length = x.shape[1]
    n1 = module.input_layernorm(x)
    q, k, v = (p(n1).view(1, length, -1, dim).transpose(1, 2) for p in (attention.q_proj, attention.k_proj,
                                                                          attention.v_proj))
    q, k = _rotated(q, cos, sin), _rotated(k, cos, sin).repeat_interleave(heads // kv_heads, 1)
    scores = (q @ k.transpose(-1, -2)).float() * attention.scaling
    future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1).to(v.dtype)
    attended = probs @ v.repeat_interleave(heads // kv_heads, 1)
    x2 = x + attention.o_proj(attended.transpose(1, 2).reshape(1, length, heads * dim))
    return x2 + module.mlp(module.post_attention_layernorm(x2))


LORA_ATTRIBUTES = ("base_layer", "lora_A", "lora_B", "scaling", "lora_dropout", "merged", "disable_adapters",
                   "active_adapters", "use_dora", "fan_in_fan_out")


def guard_lora(module: Any) -> None:
    """peft's LoRA layer: base(x) + scaling * B(A(dropout(x))), checked with a non-zero B (put back after)."""
    import torch

    missing = [name for name in LORA_ATTRIBUTES if not hasattr(module, name)]
    expect(not missing, f"{type(module).__name__} has no {', '.join(missing)}")
    name = next(iter(module.lora_A))
    b = module.lora_B[name].weight
    saved = b.detach().clone()
    try:
        with _probing(module) as tiny:
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)).to(b.device))
            x = tiny(3, module.base_layer.in_features)
            want = module.base_layer(x) + module.scaling[name] * module.lora_B[name](module.lora_A[name](x))
            expect_close(module(x), want, f"{type(module).__name__}.forward", _tolerance(module))
    finally:
        with torch.no_grad():
            b.copy_(saved)


def guard_disable_adapter(model: Any) -> None:
    """The peft model's `disable_adapter` is there to stand in for (a context manager factory)."""
    expect(callable(getattr(model, "disable_adapter", None)), f"{type(model).__name__} has no disable_adapter()")


def guard_input_cast(module: Any) -> None:
    expect(hasattr(module, "cast_input_dtype_enabled"), f"{type(module).__name__} has no cast_input_dtype_enabled")


def guard_use_triton(utils: Any) -> None:
    import torch

    expect(callable(getattr(utils, "_use_triton", None)), "trl.trainer.utils has no _use_triton")
    expect_parameters(utils._use_triton, ("device",), "_use_triton")
    expect(isinstance(utils._use_triton(torch.device("cpu")), bool), "_use_triton(cpu) is not a bool")


def guard_sampling(utils: Any) -> None:
    import torch

    expect(getattr(utils, "torch", None) is torch, "transformers.generation.utils has no `torch` global that is torch")
    expect(callable(getattr(getattr(utils, "GenerationMixin", None), "_sample", None)),
           "transformers.generation.utils.GenerationMixin has no _sample")


def guard_fused_head_forward(model: Any) -> None:
    try:
        parameters = inspect.signature(model.forward, follow_wrapped=False).parameters  # trl keeps the model's name
    except (TypeError, ValueError):
        raise Mismatch("the model's forward has no readable signature") from None
    expect("fused_lm_head" in parameters, "the model's forward takes no fused_lm_head (trl's add_fused_lm_head)")


def guard_token_scores(target: tuple[Any, Callable[[Any], tuple[Any, Any]]]) -> None:
    """target: (model, fields) where fields(model) gives trl's fused-head output and Martlet's scoring of the same
    tiny row (`rlhf_trainers.head_fields_side_by_side`). Martlet's has every field trl's has, with its values at the
    labelled positions (what trl's losses read), within 1e-4 in any dtype: both score the same hidden states, with
    the product in the activations' dtype and the rest in fp32 (so a temperature one applies and the other does not
    shows, even in bf16)."""
    import torch

    model, fields_of = target
    with _probing(model):
        want, got = fields_of(model)
    fields = {k for k, v in want.items() if v is not None}
    expect(fields <= set(got.keys()), f"trl's fused head gives {sorted(fields - set(got.keys()))} too")
    mask = got["label_mask"]
    for name in fields:
        value = want[name]
        if name != "loss" and torch.is_tensor(value) and value.shape == mask.shape:
            value = value.masked_fill(~mask, 0)
        expect_close(got[name], value, f"trl's '{name}'", 1e-4)


def guard_prepare_dataset(trainer_class: Any) -> None:
    expect(callable(getattr(trainer_class, "_prepare_dataset", None)), f"{trainer_class.__name__} has no _prepare_dataset")
    expect_parameters(trainer_class._prepare_dataset, ("dataset", "processing_class", "args", "dataset_name"),
                      f"{trainer_class.__name__}._prepare_dataset")


def guard_precompute_ref_logps(trainer_class: Any) -> None:
    hook = getattr(trainer_class, "_precompute_ref_logps", None)
    expect(callable(hook), f"{trainer_class.__name__} has no _precompute_ref_logps")
    expect_parameters(hook, ("dataset", "name", "batch_size"), f"{trainer_class.__name__}._precompute_ref_logps")


def guard_reference_cache(trainer: Any) -> None:
    hook = getattr(type(trainer), "compute_ref_log_probs", None)
    expect(callable(hook), f"{type(trainer).__name__} has no compute_ref_log_probs")
    expect_parameters(hook, ("model", "inputs"), f"{type(trainer).__name__}.compute_ref_log_probs")
    expect(isinstance(getattr(trainer, "precompute_ref_logps", None), bool),
           f"{type(trainer).__name__} has no precompute_ref_logps switch")


def guard_kto_joint_reference(target: tuple[Any, Any, Any]) -> None:
    """KTO's reference log-probs of a batch (trainer, reference model, rows): trl's own (reply rows, then KL rows)
    equal Martlet's one call on both stacked, with `calculate_KL` switched off for it."""
    trainer, reference, rows = target
    expect(getattr(trainer, "calculate_KL", None) is True, f"{type(trainer).__name__} has no calculate_KL switch on")
    want = trainer.compute_ref_log_probs(reference, rows)
    expect(isinstance(want, tuple) and len(want) == 2, "compute_ref_log_probs does not give (replies, KL rows)")
    try:
        got = trainer._joint_reference_log_probs(reference, rows)
    except Exception as error:  # (a trl that reads the KL rows regardless, say)
        raise Mismatch(f"compute_ref_log_probs with calculate_KL off fails on the stacked batch: {error!r}") from None
    for name, w, g in zip(("the replies'", "the KL rows'"), want, got):
        expect_close(g, w, f"{name} reference log-probs from the stacked batch", tolerance=1e-3)


def guard_save_checkpoint(trainer_class: Any) -> None:
    from transformers import trainer_utils

    expect_parameters(trainer_class._save_checkpoint, ("model", "trial"), "Trainer._save_checkpoint")
    expect(callable(getattr(trainer_class, "_get_output_dir", None)), "Trainer has no _get_output_dir")
    rotate = getattr(trainer_utils, "rotate_checkpoints", None)
    expect(callable(rotate), "transformers.trainer_utils has no rotate_checkpoints")
    wanted = {"output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"}
    expect(wanted <= set(inspect.signature(rotate).parameters), "rotate_checkpoints takes other keywords")


def guard_packed_weights(target: tuple[Any, Callable[[Any], list[tuple[Any, Any, str]]]]) -> None:
    """(dtype, probe): torch's private oneDNN ops are there, and `probe(dtype)`'s packed products equal torch's."""
    import torch

    dtype, probe = target
    mkldnn = getattr(torch.ops, "mkldnn", None)
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        expect(mkldnn is not None and hasattr(mkldnn, name), f"torch.ops.mkldnn has no {name}")
    expect(torch.backends.mkldnn.is_available(), "torch is built without oneDNN")
    for got, want, what in probe(dtype):
        expect_close(got, want, what, 1e-2)


def guard_accelerate(_: Any) -> None:
    expect(version("accelerate").split(".")[0] == "1", "ACCELERATE_BYPASS_DEVICE_MAP is checked with accelerate 1.x")


@dataclass(frozen=True)
class Patch:
    name: str
    library: str  # the distribution whose behaviour changes
    checked: tuple[str, ...]  # versions the patch and its guard were checked against
    what: str  # what changes, why, and the gain measured
    guard: Callable[[Any], None]  # raises Mismatch when the target changed shape
    fallback: str = "the library's own code runs"


PATCHES: dict[str, Patch] = {p.name: p for p in (
    Patch("native_rms_norm", "transformers", ("5.24.0", "5.25.0"),
          "llama-style RMSNorm modules run `native.RMSNorm` (one vectorized pass each way, statistics in fp32, "
          "rounded where transformers rounds) on CPU tensors; part of the native kernels' 13-17% shorter LoRA "
          "step (docs/en/performance.md). Guard: the module's own forward equals llama's formula on a tiny input.",
          guard_rms_norm),
    Patch("native_mlp", "transformers", ("5.24.0", "5.25.0"),
          "SiLU-gated MLPs compute silu(gate) * up in one native pass (`native.SwiGLU`, keeping only the two "
          "inputs for backward). Guard: the module's forward equals down(silu(gate(x)) * up(x)) on a tiny input.", guard_mlp),
    Patch("native_rotary", "transformers", ("5.24.0", "5.25.0"),
          "The modeling module's `apply_rotary_pos_emb` is replaced once by a dispatcher that runs `native.Rotary` "
          "(bit-identical to llama's) only inside the forward of an attention module fused by `fuse_native`, and "
          "hands every other call to the original (transformers 5.25's hub-kernel `Func` included). Guard: the "
          "original equals the rotate-half formula on a tiny input.", guard_rotary),
    Patch("native_decoder_layer", "transformers", ("5.25.0",),
          "While LoRA trains on a CPU with the native kernels, a llama-style decoder layer whose parts all run on "
          "them (norms, rotary attention, SwiGLU MLP, seven fused LoRA projections on packed weights, a "
          "padding-free row) runs as one C++ op with its autograd node (`martlet::decoder_layer`): the same kernels "
          "in the same order, the same bits, without ~20 module calls and autograd nodes a layer (a SmolLM2 LoRA "
          "step 1.038x). Any other call runs the layer's own forward. Guard: the layer's forward equals norm, "
          "rotary causal attention with grouped heads, residual, norm, MLP, residual over its own parts on a tiny "
          "input.",
          guard_decoder_layer),
    Patch("fused_lora", "peft", ("0.21.2",),
          "peft's `lora.Linear` runs base layer + adapter as one autograd node (`kernels.LoraLinear`, native "
          "kernels on a CPU): the LoRA kernels' 0.83-0.88x step time, part of SFT's 3.1-3.7x (performance.md). "
          "Guard: the layer has the attributes the fused forward reads and peft's forward equals "
          "base(x) + scaling * B(A(x)) on a tiny input with a non-zero B.", guard_lora),
    Patch("peft_fused_disable_adapter", "peft", ("0.21.2",),
          "A LoRA policy's `disable_adapter()` (how trl runs a DPO or KTO reference: once a step) switches the "
          "fused LoRA layers off through a context variable (`kernels.adapters_off`: they run their base layer "
          "alone) while every adapter layer is fused and unmerged, instead of peft's two walks "
          "over the whole model and its status report (~40-75 ms a call on SmolLM2); otherwise peft's own runs. "
          "Guard: the model has a `disable_adapter()`.", guard_disable_adapter,
          fallback="peft's disable_adapter runs (slower, same values)"),
    Patch("peft_input_cast_off", "peft", ("0.21.2",),
          "On a CPU in bf16, LoRA layers' `cast_input_dtype_enabled` is False: bf16 activations go straight into "
          "the fp32 adapters under autocast instead of two casts per adapter per pass (~19% of a step). Guard: "
          "the layer has that attribute (peft >= 0.15).", guard_input_cast),
    Patch("packed_weights", "torch", ("2.13.0",),
          "While LoRA trains on a CPU, each fused layer's frozen base weight and the frozen LM head are also held "
          "packed in oneDNN's layout (W and W^T, `train/packed.py`) and their products run "
          "`torch.ops.mkldnn._linear_pointwise` on them instead of a plain-layout product that repacks the weight "
          "every call (bf16 1.05-1.7x a product, fp32 2.4x on an AMD EPYC; an SFT step 1.09-1.16x). Guard: the "
          "two private ops exist and give torch's product and input gradient on a tiny input of the weights' "
          "dtype.", guard_packed_weights,
          fallback="torch's products run on the plain weights (slower, the same values)"),
    Patch("packed_linear", "torch", ("2.13.0",),
          "A plain `nn.Linear` whose weight Martlet packed for oneDNN (`train/packed.py`: the LM head while LoRA "
          "trains, every linear layer outside an adapter for CPU inference) runs its product on the packed copy "
          "when no gradient is asked for and its weight still fits the copy; otherwise its own forward. Generation "
          "on SmolLM2 at 1-8 rows: products 1.3-2x, the LM head 1.8-2x (bf16), fp32 up to 5x. Guard: as "
          "packed_weights, for the layer's dtype.", guard_packed_weights,
          fallback="the layer's own forward runs (slower, the same values)"),
    Patch("fast_cpu_sampling", "transformers", ("5.25.0",),
          "The generation module's `torch` global becomes a view of torch whose `multinomial` draws one token a row "
          "of CPU probabilities by inverse-CDF sampling in float64 (`infer.sampling`: the same distribution; 1.7 ms "
          "instead of 5.8-6.1 for 8 rows of 49,152 tokens, ~10% of GRPO's generation) and hands every other call "
          "and name to torch. Guard: the module's `torch` global is torch and `GenerationMixin._sample` exists.",
          guard_sampling, fallback="torch's multinomial samples (slower on a CPU, the same distribution)"),
    Patch("trl_compact_scoring", "trl", ("1.16.0",),
          "`trl.trainer.utils._use_triton` is replaced once by a dispatcher that answers True inside Martlet's "
          "padding-free preference forward (only labelled positions go through the LM head, as trl does on "
          "Triton devices) and asks the original everywhere else. Guard: it takes one `device` argument and "
          "answers a bool for the CPU.", guard_use_triton),
    Patch("trl_padding_free_forward", "trl", ("1.16.0",),
          "The policy's (and reference's) forward, already wrapped by trl's `add_fused_lm_head`, takes the padded "
          "[chosen, rejected] batch as one padding-free row (DPO/KTO 3.19x ms-swift's speed with the rest of the "
          "padding-free work). Guard: the forward accepts `fused_lm_head`.", guard_fused_head_forward),
    Patch("trl_token_scores", "trl", ("1.16.0",),
          "In the padding-free DPO/KTO/GRPO forward on a CPU Martlet computes the fields of trl's fused LM head "
          "itself (log-probs, entropy, mean logit, top-1, NLL) with `kernels.TokenScores`: one native pass over each "
          "chunk of logits, the gradient made in that pass (trl's chunked head runs a dozen torch passes forward and "
          "again backward); LoRA DPO 426-453 -> 604-648 tokens/s with the day's other changes (performance.md). "
          "GRPO's sampling temperature divides the logits as in trl's head. Guard: on a tiny row of the model at "
          "the run's temperature, every field trl's head returns, equal.", guard_token_scores),
    Patch("trl_pretokenized_rows", "trl", ("1.16.0",),
          "DPOTrainer/KTOTrainer `_prepare_dataset` returns Martlet's rows as they are (tokenized by the SFT "
          "template, so only reply tokens count) instead of trl's own tokenization. Guard: the hook's signature "
          "is (dataset, processing_class, args, dataset_name).",
          guard_prepare_dataset, fallback="the run stops: trl would tokenize Martlet's rows its own way"),
    Patch("trl_padding_free_precompute", "trl", ("1.16.0",),
          "DPOTrainer/KTOTrainer `_precompute_ref_logps` (called in trl's __init__ for --precompute_ref_log_probs, "
          "after its fused LM head is fitted) first makes the models' forward padding-free, so the reference pass "
          "before training runs as the in-step one does. Guard: the hook's signature is (dataset, name, batch_size).",
          guard_precompute_ref_logps, fallback="the precompute pass runs trl's padded forward (slower, same values)"),
    Patch("trl_reference_cache", "trl", ("1.16.0",),
          "DPOTrainer/KTOTrainer compute a row's reference log-probs the first time they see it "
          "(`compute_ref_log_probs`, for the rows not seen yet) and from then on hand them in as the columns of "
          "--precompute_ref_log_probs (`ref_chosen_logps` / `ref_rejected_logps`, `ref_logps` / `ref_KL_logps`), "
          "with `precompute_ref_logps` switched on for that call: from the second epoch on a step runs no reference "
          "forward. Guard: the hook takes (model, inputs) and the trainer has the `precompute_ref_logps` switch.",
          guard_reference_cache, fallback="every epoch runs the reference forward again (slower, same values)"),
    Patch("trl_kto_joint_reference", "trl", ("1.16.0",),
          "KTOTrainer's reference pass, where Martlet computes it (the first time a row is seen): the reply rows "
          "and their KL rows stacked into one batch for one `compute_ref_log_probs` call with `calculate_KL` off, "
          "so one forward computes both and a row's prompt runs once with its KL row's (the pass 6-14% shorter, "
          "4-6% of a KTO step). Guard: on the first batch, trl's own two-part values equal the stacked call's "
          "(within 1e-3).", guard_kto_joint_reference,
          fallback="the reference pass runs reply rows and KL rows apart (slower, same values)"),
    Patch("atomic_checkpoint", "transformers", ("5.24.0", "5.25.0"),
          "`Trainer._save_checkpoint` writes into a staging folder renamed into place: a run killed at any moment "
          "leaves only whole checkpoints. Guard: the hook takes (model, trial) and `rotate_checkpoints` takes "
          "the keywords used.",
          guard_save_checkpoint, fallback="the library's own save runs (a checkpoint may be half-written if the run is killed)"),
    Patch("accelerate_bypass_device_map", "accelerate", ("1.16.0",),
          "`ACCELERATE_BYPASS_DEVICE_MAP=true` when one process spreads its layers over several GPUs under DDP "
          "(model parallel x data parallel), which accelerate refuses otherwise. Guard: accelerate 1.x.", guard_accelerate),
)}

_verdicts: dict[tuple[str, Any], str | None] = {}  # (patch, key) -> None when usable, else why not
_warned: set[str] = set()
_originals: dict[tuple[Any, str], Any] = {}  # (module, attribute) -> what was there before a dispatcher


def version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "not installed"


def usable(name: str, target: Any, key: Any = None, remember: bool = True) -> bool:
    """Run patch `name`'s guard on `target` (once per `key`, e.g. the target's class; every time when not
    `remember`: the caller keeps the answer, e.g. on the object it is about); when it fails, warn once and answer
    False."""
    patch = PATCHES[name]
    if remember and (name, key) in _verdicts:
        reason = _verdicts[name, key]
    else:
        try:
            patch.guard(target)
            reason = None
        except Mismatch as error:
            reason = str(error)
        if remember:
            _verdicts[name, key] = reason
    if reason is not None and name not in _warned:
        _warned.add(name)
        logger.warning("patch '%s' is off: %s (%s %s; checked with %s); %s.", name, reason, patch.library,
                       version(patch.library), ", ".join(patch.checked), patch.fallback)
    return reason is None


def require(name: str, target: Any, key: Any = None) -> None:
    """For a patch with no library code to fall back to: a failed guard is an error that names it."""
    if not usable(name, target, key):
        patch = PATCHES[name]
        raise MartletError(f"Martlet's patch '{name}' does not fit {patch.library} {version(patch.library)}: "
                           f"{_verdicts[name, key]}.",
                           hint=f"Install a checked version ({', '.join(patch.checked)}); `make install` does.")


def patch_forward(name: str, module: Any, forward: Callable[..., Any], guarded: Any = None) -> bool:
    """Patch `name` on one module: its forward becomes `forward` bound to it (the one it had stays callable as
    `module._plain_forward`), when the guard passes for the module's class (or for `guarded`, what the new
    forward relies on instead of the module itself). Idempotent.

    The module's class becomes a subclass of its own (same name, one per class and patch) whose forward is
    `forward`, and the instance's `forward` attribute is set too: transformers 5.25 deletes instance `forward`
    attributes of its hub-kernel layers (RMSNorm) at `model.train()`, which silently undid an instance-only
    patch; an instance attribute set by someone else (accelerate's hooks) would otherwise shadow the class."""
    if getattr(type(module), "_martlet_patch", None) == name:
        return True
    if not (usable(name, module, key=type(module)) if guarded is None else usable(name, guarded, key=guarded)):
        return False
    plain, cls = module.forward, type(module)
    patched = _patched_classes.get((cls, name))
    if patched is None:
        patched = type(cls.__name__, (cls,), {"forward": forward, "_martlet_patch": name,
                                              "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _patched_classes[cls, name] = patched
    module.__class__ = patched
    module._plain_forward = plain
    module.forward = types.MethodType(forward, module)
    return True


_patched_classes: dict[tuple[type, str], type] = {}


def patch_global(name: str, owner: Any, attribute: str, make: Callable[[Any], Callable[..., Any]]) -> bool:
    """Patch `name` on a module global: `owner.attribute` is replaced, once, by `make(original)`, a function that
    hands every call it does not take to the original. The guard looks at the original."""
    if (owner, attribute) in _originals:
        return True
    if not usable(name, owner, key=owner):
        return False
    original = getattr(owner, attribute)
    _originals[owner, attribute] = original
    setattr(owner, attribute, make(original))
    return True


def restore_globals() -> None:
    """Put every replaced module global back (tests)."""
    for (owner, attribute), original in list(_originals.items()):
        setattr(owner, attribute, original)
        del _originals[owner, attribute]


def patch_attribute(name: str, obj: Any, attribute: str, value: Any) -> bool:
    """Patch `name`: a documented attribute of a library object set to `value`, when the guard passes for its class."""
    if not usable(name, obj, key=type(obj)):
        return False
    setattr(obj, attribute, value)
    return True


def patch_environment(name: str, variable: str, value: str) -> bool:
    """Patch `name`: an environment variable the library reads, for the rest of the process."""
    if not usable(name, None):
        return False
    os.environ[variable] = value
    return True

"""Native CPU kernels for the element-wise work of a training step, compiled for this machine at first use.

A LoRA step on a CPU spent a third of its time outside the matrix products: the LoRA dropout's random numbers
(drawn by one thread), RMSNorm, SwiGLU, the rotary embedding, the attention softmax and the loss as chains of
small torch operations, each a pass over the activations. Here each is one parallel, vectorized pass
(`csrc/martlet_native.cpp`):

- `lora_down` / `lora_up_` / `lora_up_backward` / `lora_down_backward`: a LoRA adapter's two thin products and
  their gradients, one pass over the rows each (oneDNN runs rank-8 products at a few percent of its speed), the
  dropout applied on the way with a mask from a counter-based random stream (any thread computes any part of it;
  the backward pass recomputes it from the seed instead of keeping it; `dropout_mask` shows it whole);
- `rms_norm` / `rms_norm_backward`: llama's RMSNorm, statistics in fp32, rounded where transformers rounds;
- `swiglu` / `swiglu_backward`: silu(gate) * up;
- `rotary`: llama's rotary position embedding of q and k, forward and backward;
- `cross_entropy_grad_`: the loss of a chunk of logits and, in place, its gradient (the lean loss's inner step);
- `causal_softmax` / `causal_softmax_backward`: scaling, causal mask and softmax of one sample's attention scores
  (`train/varlen_attention.py`).

The source is compiled once per machine, torch version and source text, with the system's C++ compiler
(`$CXX`, else `c++`), into Martlet's cache (`native/`), written beside its final name and renamed into place,
so a build killed halfway is never loaded. Without a compiler (or with `MARTLET_NATIVE=0`) nothing changes but
speed: every caller falls back to plain torch. They run by default only where they were measured faster than
torch: x86 CPUs with AVX-512 (`wanted`). The equivalence with the torch computation is tested in
`tests/unit/test_native.py`.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from martlet import patches
from martlet.models.dtype import EMULATED_ISAS, cpu_architecture, cpuinfo_features, emulated_isa, features_of
from martlet.utils import env_switch

logger = logging.getLogger("martlet")

SOURCE = Path(__file__).with_name("csrc") / "martlet_native.cpp"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++20", "-shared", "-fPIC"]  # no FMA: torch rounds each product
_loaded: dict[str, Any] = {}
_LIBRARIES: set[str] = set()  # the build this process has loaded (one at most)


def ops() -> Any | None:
    """`torch.ops.martlet` once the kernels are built and loaded, else None (no compiler, not Linux, disabled). Where
    only the fused attention is wanted (`attention_wanted`), the other kernels stay off: `usable` says None."""
    if "ops" not in _loaded:
        _loaded["ops"] = None
        _loaded["all"] = wanted()
        if not (_loaded["all"] or attention_wanted()):
            return None
        try:
            library = str(build())
            if not _LIBRARIES:  # a process registers the namespace once: another build's load would abort it
                torch.ops.load_library(library)
                _LIBRARIES.add(library)
            _loaded["ops"] = torch.ops.martlet
        except Exception as error:  # a missing or failing compiler costs speed, never the run
            logger.warning("native CPU kernels unavailable, plain torch runs instead (%s)", _first_lines(error))
    return _loaded["ops"]


def wanted() -> bool:
    """Whether to run the kernels: `MARTLET_NATIVE=0` never, `=1` always, unset (auto) where they were measured
    faster than plain torch. That is x86 with AVX-512. Built for AVX2 alone (emulated with MARTLET_CPU_ISA=avx2,
    `benchmarks/sft_throughput.py --cpu_isa avx2 --baseline martlet-torch`), a LoRA SFT step with every kernel ran
    1.05x torch's own AVX2 kernels, with the fused attention alone 1.16x: the attention alone runs there
    (`attention_wanted`). ARM is unmeasured: it runs plain torch."""
    setting = env_switch("MARTLET_NATIVE")
    return setting if setting is not None else "avx512f" in cpu_features()


def attention_wanted() -> bool:
    """Whether to run the fused attention (`Attention`, train/varlen_attention.py), the one kernel measured faster
    than torch on x86 CPUs with AVX2 alone too (emulated: 30 SmolLM2 layers fwd+bwd on an SFT row 2.2x, fp32); the
    others stay off there. `MARTLET_NATIVE` decides for it as for the rest."""
    setting = env_switch("MARTLET_NATIVE")
    return setting if setting is not None else bool({"avx512f", "avx2"} & set(cpu_features()))


def attention_only() -> bool:
    """Whether the kernels loaded for the fused attention alone (an AVX2 CPU)."""
    return ops() is not None and not _loaded.get("all", True)


def usable(*tensors: torch.Tensor) -> Any | None:
    """The kernels, if they can take these tensors: on the CPU, bf16 or fp32 alike, contiguous."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in (torch.bfloat16, torch.float32):
        return None
    if torch.compiler.is_compiling():  # torch.compile traces the plain torch code (the kernels have no fake form)
        return None
    if any(t.dtype != first.dtype or t.device != first.device or not t.is_contiguous() for t in tensors):
        return None
    found = ops()
    return found if _loaded.get("all", True) else None  # loaded for the fused attention alone: the rest stay off


def compile_flags() -> list[str]:
    """FLAGS, for the emulated ISA when there is one."""
    isa = emulated_isa()
    return [f if f != "-march=native" else f"-march={EMULATED_ISAS[isa][0]}" for f in FLAGS] if isa else FLAGS


def build(flags: list[str] | None = None, source: Path = SOURCE) -> Path:
    """The compiled library for this machine (`compile_flags()`), building it if the cache has none. (Other
    `flags`: tests build the generic code a machine without AVX-512 compiles; another `source`: benchmarks/step_ab.py
    builds an earlier revision's beside this one.)"""
    from torch.utils import cpp_extension

    from martlet.models.embedded import cache_dir

    flags = flags or compile_flags()
    compiler = os.environ.get("CXX", "c++")
    command = [compiler, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    command += [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = []
    for path in cpp_extension.library_paths():
        libraries += [f"-L{path}", f"-Wl,-rpath,{path}"]
    libraries += ["-lc10", "-ltorch_cpu", "-ltorch"]
    key = hashlib.sha256("\n".join([source.read_text(), torch.__version__, sys.platform, *command, *libraries,
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    target = Path(cache_dir()) / "native" / f"martlet_native-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    logger.info("compiling Martlet's native CPU kernels for this machine (once, ~20 s)")
    try:
        done = subprocess.run([*command, str(source), "-o", str(partial), *libraries], capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # whole or absent: a build killed halfway leaves only the partial file
    finally:
        partial.unlink(missing_ok=True)
    _forget_old_builds(target.parent, keep=4)
    return target


def _forget_old_builds(folder: Path, keep: int) -> None:
    """Builds of earlier sources pile up (one per Martlet version): keep the newest few. A process that has one
    loaded keeps its copy (the file stays open until it exits)."""
    builds = sorted(folder.glob("martlet_native-*.so"), key=lambda path: path.stat().st_mtime, reverse=True)
    for old in builds[keep:]:
        old.unlink(missing_ok=True)


def _cpu_flags() -> str:
    """What -march=native compiles for: a library built on one CPU is not loaded on another."""
    return cpuinfo_features() or platform.processor()


def cpu_features() -> list[str]:
    """The CPU features the kernels' code paths depend on, as /proc/cpuinfo names them (x86: avx2, avx512f,
    avx512_bf16, amx_bf16; ARM: asimd, sve), for the architecture this process runs (`dtype.features_of`)."""
    flags = features_of(_cpu_flags())
    isa = emulated_isa()
    names = EMULATED_ISAS[isa][1] if isa else ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")
    return [name for name in names if name in flags]


def kernel_path() -> str:
    """Which code the native kernels run here: the path -march=native compiles for this CPU, or plain torch."""
    if ops() is None:
        if not wanted() and os.environ.get("MARTLET_NATIVE") is None:
            if cpu_architecture() == "arm":
                return "plain torch (the native kernels are unmeasured on ARM: MARTLET_NATIVE=1 runs them)"
            return "plain torch (the native kernels run on AVX-512 CPUs only: measured slower than torch here)"
        return "plain torch (native kernels off: MARTLET_NATIVE=0, no compiler, or a failed build)"
    features = cpu_features()
    emulated = " (emulated: MARTLET_CPU_ISA)" if emulated_isa() else ""
    if "avx512f" in features and "avx512_bf16" in features:
        dots = "; LoRA and attention products on vdpbf16ps" if ops().bf16_dot() else ""  # what the build compiled
        return f"native, AVX-512 with AVX512-BF16 (vcvtneps2bf16{dots})"
    if "avx512f" in features:
        return f"native, AVX-512{emulated}"
    vectors = f"generic vectors ({'AVX2' if 'avx2' in features else platform.machine()}){emulated}"
    if attention_only():
        return f"plain torch, but the attention's fused native pass ({vectors}; the other kernels measured slower here)"
    return f"native, {vectors}"


def _first_lines(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return " ".join(text[:3])[:300] or type(error).__name__


# ------------------------------------------------------------------------------------------------------------
# autograd functions over the kernels
class RMSNorm(torch.autograd.Function):
    """llama's RMSNorm, `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, in one pass each way."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = ops().rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = ops().rms_norm_backward(grad, x, weight, rstd) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # full fine-tuning: the norm's weight trains too
            normed = (x.float().view(-1, x.shape[-1]) * rstd[:, None]).to(x.dtype)
            grad_w = (grad.view(-1, x.shape[-1]).float() * normed.float()).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


class SwiGLU(torch.autograd.Function):
    """`silu(gate) * up`, keeping only the two inputs for the backward pass."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return ops().swiglu(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return ops().swiglu_backward(grad.contiguous(), gate, up)


class Rotary(torch.autograd.Function):
    """llama's rotary embedding of one of q, k (batch, heads, length, dim), cos and sin (batch, length, dim)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return ops().rotary(x.transpose(1, 2), cos, sin, False).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return ops().rotary(grad.transpose(1, 2).contiguous(), cos, sin, True).transpose(1, 2), None, None


class CausalSoftmax(torch.autograd.Function):
    """`softmax(scale * scores)` with every key after the query's position masked out, for scores
    (..., k * length, length) whose row r belongs to query position r % length; probabilities in the scores'
    dtype (computed in fp32)."""

    @staticmethod
    def forward(ctx, scores, scale):
        probs = ops().causal_softmax(scores, scale)
        ctx.save_for_backward(probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        return ops().causal_softmax_backward(grad.contiguous(), probs, ctx.scale), None


class Attention(torch.autograd.Function):
    """A padding-free row's attention, each sample on its own tokens after its shared prefix if any: q (T * heads,
    dim) and k, v (T * kv_heads, dim) rows, `samples` (count, 4) int64 of (start, length, prefix_start, prefix).
    One fused pass a sample and key/value head each way; only the output and each query row's logsumexp are kept
    for the backward pass (the kernel's comment in martlet_native.cpp)."""

    @staticmethod
    def forward(ctx, q, k, v, samples, heads, scale):
        out, lse = ops().attention(q, k, v, samples, heads, scale)
        ctx.save_for_backward(q, k, v, samples, out, lse)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, samples, out, lse = ctx.saved_tensors
        dq, dk, dv = ops().attention_backward(grad.contiguous(), q, k, v, samples, out, lse, ctx.heads, ctx.scale)
        return dq, dk, dv, None, None, None


def rotary_usable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """q and k as llama's attention makes them, (batch, heads, length, dim) views of (batch, length, heads, dim)."""
    if cos.requires_grad or sin.requires_grad or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or q.shape[-1] % 2:
        return False
    batch, _, length, dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, length, dim) or cos.shape != sin.shape:
        return False
    if cos.shape[0] not in (1, batch) or tuple(cos.shape[1:]) != (length, dim):
        return False
    return usable(q.transpose(1, 2), k.transpose(1, 2), cos, sin) is not None


# transformers classes whose forward is llama's (each guarded by a reference computation in `martlet.patches`)
LLAMA_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "GraniteRMSNorm",
                   "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "DeepseekV3RMSNorm", "Phi3RMSNorm")
LLAMA_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "GraniteMLP", "GemmaMLP", "Gemma2MLP", "Olmo2MLP",
              "Qwen2MoeMLP", "Qwen3MoeMLP", "DeepseekV3MLP")


SILU = ("SiLU", "SiLUActivation")  # torch's, transformers' (`nn.functional.silu`)


# attention classes whose module's `apply_rotary_pos_emb` is llama's (each guarded in `martlet.patches`)
LLAMA_ROTARY_ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention",
                           "GraniteAttention", "Qwen2MoeAttention", "Qwen3MoeAttention", "GemmaAttention",
                           "Gemma2Attention")


def fuse_native(model: torch.nn.Module) -> int:
    """Run the model's RMSNorms, SiLU-gated MLPs and rotary embeddings through the native kernels where a call's
    tensors allow it (CPU, bf16 or fp32, contiguous; otherwise the module's own code runs). Each kind is a patch
    of `martlet.patches`, applied where its guard finds the library's code as expected. Returns how many modules."""
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name in LLAMA_ROTARY_ATTENTIONS:
            library = sys.modules[type(module).__module__]
            count += (patches.patch_global("native_rotary", library, "apply_rotary_pos_emb", _rotary_dispatcher)
                      and patches.patch_forward("native_rotary", module, _attention_forward, guarded=library))
        elif name in LLAMA_RMS_NORMS:
            count += patches.patch_forward("native_rms_norm", module, _rms_norm_forward)
        elif name in LLAMA_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU:
            count += patches.patch_forward("native_mlp", module, _mlp_forward)
    return count


def _rms_norm_forward(self, hidden_states):
    if usable(hidden_states, self.weight) is None:
        return self._plain_forward(hidden_states)
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if usable(gate, up) is None:
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(SwiGLU.apply(gate, up))


# True while the forward of an attention module fused by `fuse_native` runs (this thread / task only)
_in_fused_attention: contextvars.ContextVar[bool] = contextvars.ContextVar("martlet_fused_attention", default=False)


def _rotary_dispatcher(original: Any) -> Any:
    """What a modeling module's `apply_rotary_pos_emb` becomes (once, `patches.patch_global`): inside a fused
    attention's forward, the native rotary embedding (the same values, each rounding where torch rounds) for the
    calls it can take; every other call goes to the original."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (_in_fused_attention.get() and not kwargs and args in ((), (1,))
                and rotary_usable(q, k, cos, sin)):
            return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


def _attention_forward(self, *args, **kwargs):
    token = _in_fused_attention.set(True)
    try:
        return self._plain_forward(*args, **kwargs)
    finally:
        _in_fused_attention.reset(token)

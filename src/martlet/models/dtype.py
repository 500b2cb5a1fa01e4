"""`--dtype AUTO|bf16|fp16|fp32` and what the hardware computes natively."""

from __future__ import annotations

import functools
import os
import platform

from martlet.errors import MartletError

DTYPES = ("AUTO", "bf16", "fp16", "fp32")


# CPUs Martlet can behave as on this one (MARTLET_CPU_ISA): the x86-64 level its kernels build for, the features it reports
EMULATED_ISAS = {
    "avx2": ("x86-64-v3", ("avx2",)),  # a laptop or desktop without AVX-512
    "avx512": ("x86-64-v4", ("avx2", "avx512f")),  # AVX-512 without BF16 or AMX: Skylake-SP to Ice Lake Xeons
}


def emulated_isa() -> str | None:
    """`MARTLET_CPU_ISA=avx2` or `avx512`: behave as on a CPU with AVX2 and no AVX-512, or AVX-512 without AVX512-BF16
    and AMX (the native kernels built for that x86-64 level, the features reported without the rest, `--dtype AUTO`
    fp32), to measure what such a CPU runs. torch's own kernels follow with ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY
    and MKL_ENABLE_INSTRUCTIONS, set before torch loads (benchmarks/sft_throughput.py --cpu_isa sets them)."""
    value = os.environ.get("MARTLET_CPU_ISA", "").strip().lower()
    if value in ("", "native"):
        return None
    if value not in EMULATED_ISAS:
        raise ValueError(f"MARTLET_CPU_ISA={value!r}: the emulated ISAs are {', '.join(EMULATED_ISAS)} (or native)")
    return value


_ARCHITECTURES = {"x86_64": "x86", "amd64": "x86", "i386": "x86", "i686": "x86", "aarch64": "arm", "arm64": "arm"}


def cpu_architecture() -> str | None:
    """'x86' or 'arm': the architecture this process runs (under an emulator, the emulated one), else None."""
    return _ARCHITECTURES.get(platform.machine().lower())


def cpuinfo_features() -> str:
    """/proc/cpuinfo's first line of CPU features: x86's `flags`, ARM's `Features` ('' where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((line for line in fh if line.split(":", 1)[0].strip() in ("flags", "Features")), "")
    except OSError:
        return ""


def features_of(line: str) -> frozenset[str]:
    """The feature names of a `cpuinfo_features()` line, where it describes the architecture this process runs: an
    aarch64 process emulated on an x86 host (qemu-user, a multi-arch container) reads the host's x86 line, and must
    not take itself for an AVX-512 CPU."""
    label, _, names = line.partition(":")
    ours = {"x86": "flags", "arm": "Features"}.get(cpu_architecture())
    return frozenset(names.split()) if label.strip() == ours else frozenset()


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    override = os.environ.get("MARTLET_CPU_BF16")
    if override is not None:
        return override.lower() in ("1", "true", "yes")
    if emulated_isa():  # an AVX2 laptop or an AVX-512 Xeon without BF16, emulated
        return False
    return bool(features_of(cpuinfo_features()) & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device: str | None = None) -> str:
    """The compute dtype ('bf16', 'fp16' or 'fp32') for `--dtype name` on `device` ('cuda' or 'cpu').

    AUTO: bf16 on a GPU that computes it (Ampere and newer), fp16 on older GPUs (V100), bf16 on a CPU
    with AVX512-BF16/AMX, else fp32.
    """
    name = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "AUTO"}.get(name, name)
    if name not in DTYPES:
        raise MartletError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}.", field="dtype")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "AUTO":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "fp32"
    if device == "cpu" and name == "fp16":
        raise MartletError("fp16 training needs a GPU.", field="dtype", hint="Use --dtype AUTO, bf16 or fp32 on a CPU.")
    return name


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]

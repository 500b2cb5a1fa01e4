"""Distributed launch: the spec's NPROC_PER_NODE / NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT.

`NPROC_PER_NODE=2 martlet sft ...` re-runs the same command under `torch.distributed.run` (torchrun), which
starts the processes and sets RANK / LOCAL_RANK / WORLD_SIZE for each; transformers' Trainer then trains
with DDP (NCCL on GPUs, gloo on CPUs), or with DeepSpeed / FSDP when asked. Nothing here is home-made
beyond building the torchrun command line.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import os
import subprocess
import sys
from typing import Sequence

from martlet.errors import MartletError
from martlet.models.dtype import cpu_architecture

TRAINING_COMMANDS = ("sft", "pt", "rlhf", "dpo", "orpo")
# The memory allocator a training process runs with: a CPU training step allocates ~90,000 blocks (autograd's
# nodes, torch's tensors, the kernels' buffers) and glibc's malloc spent ~6% of the main thread's time on them,
# while the second core waited. tcmalloc: SmolLM2 LoRA steps 1.05x (median of 5 process pairs, 1.03x-1.13x; the
# benchmark's SFT side 1.00x-1.07x), the same peak RSS; jemalloc 1.00x (not used). Searched in the linker's cache.
ALLOCATORS = ("tcmalloc_minimal", "tcmalloc")
ALLOCATOR_NAMES = ("tcmalloc", "jemalloc", "mimalloc")  # one of these in LD_PRELOAD: the user chose already


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        raise MartletError(f"must be a whole number, got {value!r}.", field=name) from None
    if number < (0 if name == "NODE_RANK" else 1):
        raise MartletError(f"out of range: {number}.", field=name)
    return number


def wants_launch(command: str) -> bool:
    """True for a training command asked to run on several processes, when not already inside torchrun."""
    if command not in TRAINING_COMMANDS or "LOCAL_RANK" in os.environ:
        return False
    return _int_env("NPROC_PER_NODE", 1) > 1 or _int_env("NNODES", 1) > 1


def _malloc_choice(environ) -> str:
    """MARTLET_MALLOC: `auto` (the default), `system`, or a library's path."""
    return environ.get("MARTLET_MALLOC", "auto").strip() or "auto"


def _preloads(command: str) -> bool:
    """Whether an allocator is preloaded for this command at all: training commands, on Linux."""
    return command in (*TRAINING_COMMANDS, "grpo") and sys.platform.startswith("linux")


def _auto_applies(command: str, architecture: str | None = None) -> bool:
    """Whether `auto` preloads tcmalloc for this command here: on x86, where it was measured (ARM unmeasured)."""
    return _preloads(command) and (architecture or cpu_architecture()) == "x86"


@functools.cache
def _system_tcmalloc() -> str | None:
    """tcmalloc's library in the linker's cache, searched once a process (~8 ms a name it lacks)."""
    return _first_tcmalloc(ctypes.util.find_library)


def _first_tcmalloc(find) -> str | None:
    return next((found for found in map(find, ALLOCATORS) if found), None)


def _tcmalloc(find=None) -> str | None:
    """tcmalloc's library: in the linker's cache, or as `find` (tests' stand-in for the search) finds it."""
    return _system_tcmalloc() if find is None else _first_tcmalloc(find)


def allocator_library(command: str, environ=os.environ, find=None, architecture: str | None = None) -> str | None:
    """The malloc library to preload for `martlet <command>` (LD_PRELOAD), or None: training commands on Linux,
    unless LD_PRELOAD names an allocator already or MARTLET_MALLOC says otherwise (`system`: glibc's malloc;
    a library's path: that one; `auto`, the default: tcmalloc where the system has it, on x86 (`_auto_applies`)).
    `find` stands in for the linker cache's search (tests)."""
    choice, preloaded = _malloc_choice(environ), environ.get("LD_PRELOAD", "")
    if not _preloads(command) or choice == "system":
        return None
    if choice in preloaded.split(":") or any(name in preloaded for name in ALLOCATOR_NAMES):
        return None
    if choice != "auto":
        if not os.path.isfile(choice):
            raise MartletError(f"no such file: {choice}.", field="MARTLET_MALLOC",
                               hint="Give a malloc library's path, 'auto' (tcmalloc where installed) or 'system'.")
        return choice
    if not _auto_applies(command, architecture):
        return None
    return _tcmalloc(find)


def allocator_environment(command: str, environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with `allocator_library(command, environ)` preloaded, or None when there is none to preload."""
    library = allocator_library(command, environ)
    if library is None:
        return None
    env = {**environ, "LD_PRELOAD": ":".join(filter(None, (library, environ.get("LD_PRELOAD"))))}
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no line for each large model tensor
    return env


def preload_allocator(command: str, argv: Sequence[str]) -> None:
    """Run this command again with `allocator_library` preloaded, if there is one to preload: os.execve, so the
    same process (its id, its parent's view of it, its streams) goes on with the allocator in place of glibc's
    malloc, which cannot be swapped once a process runs."""
    env = allocator_environment(command, dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command_line(command, argv), env)


def command_line(command: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `martlet command argv` again: this process's own where it was started so
    (`sys.orig_argv`: the `martlet` script or `python -X ... -W ... -m martlet.cli`, the interpreter's options kept),
    else `python -m martlet.cli command argv` (a wrapper that set sys.argv itself, a program read from stdin)."""
    original, tail = list(getattr(sys, "orig_argv", ())), [command, *argv]
    start = len(original) - len(tail)
    if start > 1 and original[start:] == tail and original[start - 1] != "-":
        return [sys.executable, *original[1:]]
    return [sys.executable, "-m", "martlet.cli", *tail]


SYSTEM_MALLOC = "the C library's malloc"


def allocator_in_use() -> str:
    """The malloc this process runs: a preloaded allocator's file name, or glibc's (read from the process's maps)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            names = {line.rsplit("/", 1)[-1].strip() for line in fh if "/" in line}
    except OSError:
        return SYSTEM_MALLOC
    found = sorted(name for name in names if any(a in name for a in ALLOCATOR_NAMES))
    return found[0] if found else SYSTEM_MALLOC


def allocator_report(command: str = "sft", used: str | None = None, environ=os.environ, find=None,
                     architecture: str | None = None) -> str:
    """The run log's line on the allocator: the one in use and, where glibc's runs though `auto` would have taken
    tcmalloc (x86 Linux), how to have it."""
    used = used or allocator_in_use()
    line = f"memory allocator: {used}"
    if used != SYSTEM_MALLOC or not _auto_applies(command, architecture):
        return line
    if _malloc_choice(environ) != "auto":
        return line + " (MARTLET_MALLOC)"
    if _tcmalloc(find):
        return line + (" (tcmalloc is installed: the `martlet` commands preload it; a Python process started with "
                       "LD_PRELOAD=libtcmalloc_minimal.so.4 runs it too)")
    return line + (" (with tcmalloc installed, `apt install libtcmalloc-minimal4` or your system's package, the "
                   "training commands run with it: 1.02x-1.08x a CPU step, docs/en/performance.md)")


def torchrun_command(command: str, argv: Sequence[str]) -> list[str]:
    nproc = _int_env("NPROC_PER_NODE", 1)
    nnodes = _int_env("NNODES", 1)
    node_rank = _int_env("NODE_RANK", 0)
    if node_rank >= nnodes:
        raise MartletError(f"must be below NNODES={nnodes}, got {node_rank}.", field="NODE_RANK")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _int_env("MASTER_PORT", 29500)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
           f"--node_rank={node_rank}", f"--master_addr={addr}", f"--master_port={port}"]
    return cmd + ["-m", "martlet.cli", command, *argv]


def launch(command: str, argv: Sequence[str]) -> int:
    """Run `martlet <command> argv` under torchrun; the exit status is torchrun's."""
    import torch

    cmd = torchrun_command(command, argv)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # the processes share the cores: one thread each unless told otherwise
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _int_env("NPROC_PER_NODE", 1))))
    print("martlet: launching " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main_process_first():
    """A context: rank 0 runs the body first (tokenizing, caching, creating folders), then the others."""
    if not is_distributed():
        return contextlib.nullcontext()
    return _state().main_process_first()


def _state():
    """accelerate's process state. On a machine without CUDA it must be asked for `cpu=True`: otherwise it
    reports a single process under torchrun, and its barriers (main_process_first) do nothing."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def broadcast(value):
    """Rank 0's value on every rank (a run folder name, say)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    _state()  # initialises the process group from torchrun's environment
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close_process_group() -> None:
    """Destroy the process group a command's training set up (torchrun's ranks), before the interpreter exits: a
    gloo group left up can abort a rank at exit ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

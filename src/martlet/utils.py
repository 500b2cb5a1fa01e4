"""Small shared helpers."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import stat
import sys
import warnings
from typing import Callable, Iterator


# Library log lines that tell a user nothing to act on in a normal run: logger -> the start of the message.
# bitsandbytes (0.50, with the `kernels` package) tries, at import, to fetch a CPU kernel from a hub, offline or
# not, even when nothing is quantized; its own code runs without it, and `kernels` says why it could not.
QUIET_LIBRARY_LINES = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
                       "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/"}


class _QuietLines(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# transformers 5's deprecated gradient-checkpointing methods, which peft 0.21 (wrapping a model) and trl 1.16 (around
# DPO's and KTO's reference forward, GRPO's generation) call on the user's behalf: FutureWarnings a user would see and
# cannot act on
LIBRARY_DEPRECATIONS = ("is_gradient_checkpointing", "gradient_checkpointing_enable", "gradient_checkpointing_disable")


@contextlib.contextmanager
def libraries_quietly() -> Iterator[None]:
    """Around library code that calls `LIBRARY_DEPRECATIONS` (peft's model wrapping, trl's reference forward and
    generation): those FutureWarnings dropped, every other warning as it was."""
    with warnings.catch_warnings():
        for name in LIBRARY_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=f".*`{name}` is deprecated", category=FutureWarning)
        yield


def quiet_library_lines() -> None:
    """Drop the lines of `QUIET_LIBRARY_LINES` (before the libraries are imported: some speak at import)."""
    for name, start in QUIET_LIBRARY_LINES.items():
        library_logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLines) for f in library_logger.filters):
            library_logger.addFilter(_QuietLines(start))


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a line is logged, not the stream it was at set-up: a caller that
    redirects or captures stdout, and closes it after, leaves no handler writing to a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Martlet's log lines on stdout, once; the libraries' own chatter kept at warnings (the lines of
    `QUIET_LIBRARY_LINES` are dropped from `import martlet` on)."""
    logger = logging.getLogger("martlet")
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("[martlet %(levelname)s] %(message)s"))
        logger.addHandler(handler)
        # under torchrun the other ranks only speak up for warnings
        logger.setLevel(level if os.environ.get("RANK", "0") == "0" else max(level, logging.WARNING))
        logger.propagate = False
    try:
        import transformers

        transformers.logging.set_verbosity_warning()
    except ImportError:
        pass
    return logger


def env_switch(name: str) -> bool | None:
    """An on/off environment variable: False for `0`, `false`, `no`, `off`; True for `1`, `true`, `yes`, `on`; None
    when unset or anything else (auto: the caller decides)."""
    setting = os.environ.get(name, "auto").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give a written file, or everything inside a written folder, the permissions the umask gives a new file
    (0666 & ~umask; folders and executables 0777 & ~umask). Some writers create theirs private (safetensors
    0.8 makes its files 0600), so another user, or a container under another uid, could not read a checkpoint,
    a merged model or the shared model cache. Files of other owners and links are left alone."""
    mask = current_umask()
    paths = [path] if not os.path.isdir(path) else [
        os.path.join(root, name) for root, dirs, files in os.walk(path) for name in dirs + files]
    for item in paths:
        info = os.lstat(item)
        if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
            continue
        full = 0o777 if stat.S_ISDIR(info.st_mode) or info.st_mode & 0o111 else 0o666
        if stat.S_IMODE(info.st_mode) != full & ~mask:
            os.chmod(item, full & ~mask)


# Whether a `frozen_heap` context owns the collector's permanent generation now (the outermost one does)
_HEAP_OWNED = [False]


@contextlib.contextmanager
def frozen_heap() -> Iterator[Callable[[], None]]:
    """Python's full garbage collections scan every object the process holds: ~560,000 once torch, transformers and
    a model are loaded, ~250 ms a pass on the benchmark's host. A training command's startup met nine (seven while
    the libraries import, one while the tokenizer's JSON loads, one in accelerate's `free_memory` as training
    begins: ~1.3 s), and long runs meet more. Inside, the objects already there move to the collector's permanent
    generation, which it does not scan, and so does everything alive at each call of the function given (a run's
    model and data, once loaded); at the end they come back to it, so nothing is left uncollectable after a run
    started from Python, and a process's exit finalizes them as usual. Cycles that become garbage while
    frozen are collected then (at a training run's start a full collection finds ~150 such objects). Nested
    contexts freeze more and leave the end to the outermost; objects frozen by something else are left alone (the
    function then does nothing)."""
    if _HEAP_OWNED[0]:
        yield gc.freeze
        return
    if gc.get_freeze_count():  # another owner of the permanent generation
        yield lambda: None
        return
    _HEAP_OWNED[0] = True
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        _HEAP_OWNED[0] = False
        gc.unfreeze()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection inside (imports: every full pass would scan all that was imported so far)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

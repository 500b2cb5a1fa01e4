"""Registrations that come with a run: `--custom_register_path my_register.py` (a Python file that calls
`register_dataset`, `register_model` or `register_template`) and `--custom_dataset_info my_datasets.json`.

Applied once, at the start of every command that takes them (sft, pt, rlhf, infer), before the model, template
and data are resolved, so a registered name works wherever a built-in one does; a checkpoint's held-out rows are
read with the registrations of the run that wrote it. Each file runs once per process.
"""

from __future__ import annotations

import importlib.util
import os

from martlet.args.data import DataArguments
from martlet.data.sources import register_dataset_info
from martlet.errors import MartletError

_loaded: set[str] = set()


def apply_custom_registrations(args: DataArguments) -> None:
    """Run every --custom_register_path file (once per process), then register --custom_dataset_info."""
    for path in args.custom_register_path or []:
        run_register_file(path)
    if args.custom_dataset_info:
        register_dataset_info(args.custom_dataset_info)


def run_register_file(path: str) -> None:
    """Import a user's registration file once; its errors name the file (and line, when it has one)."""
    full = os.path.abspath(os.path.expanduser(path))
    if full in _loaded:
        return
    if not os.path.isfile(full):
        raise MartletError("registration file not found.", file=path, field="custom_register_path")
    spec = importlib.util.spec_from_file_location(f"martlet_custom_{len(_loaded)}", full)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except MartletError as exc:
        raise MartletError(f"{exc}", file=path, field="custom_register_path") from None
    except Exception as exc:  # the user's code: any error, reported with where it happened
        tb = exc.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == full:
                line = tb.tb_lineno
            tb = tb.tb_next
        raise MartletError(f"{type(exc).__name__}: {exc}", file=path, line=line, field="custom_register_path") from None
    _loaded.add(full)

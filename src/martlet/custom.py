"""Registrations that come with a run: `--custom_register_path my_register.py` (a Python file that calls
`register_dataset`, `register_model` or `register_template`) and `--custom_dataset_info my_datasets.json`.

Applied at the start of every command, before the model, template and data are resolved, so a registered
name works wherever a built-in one does. Each file runs once per process.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from martlet.errors import MartletError

_loaded: set[str] = set()


def apply_custom_registrations(args: Any) -> None:
    for path in getattr(args, "custom_register_path", None) or []:
        run_register_file(path)
    if getattr(args, "custom_dataset_info", None):
        from martlet.data.sources import register_dataset_info

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

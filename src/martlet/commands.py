"""Small listing commands."""

from __future__ import annotations

from typing import Sequence

from martlet.data.sources import dataset_registry
from martlet.models.registry import all_models
from martlet.templates import template_entry, template_names


def list_models(argv: Sequence[str] = ()) -> int:
    for name, info in sorted(all_models().items()):
        print(f"{name:<36} {info.hf_id or '-':<48} template={info.template}")
    return 0


def list_datasets(argv: Sequence[str] = ()) -> int:
    for name, entry in sorted(dataset_registry().items()):
        where = "built-in" if entry.get("builtin") else (entry.get("hf_id") or entry.get("ms_id") or entry.get("path"))
        print(f"{name:<24} {where:<44} {entry.get('description', '')}")
    return 0


def list_templates(argv: Sequence[str] = ()) -> int:
    for name in template_names():
        entry = template_entry(name)
        print(f"{name:<12} eot={entry.get('eot')!r:<28} {entry.get('description', '')}")
    return 0

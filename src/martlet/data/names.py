"""`DatasetName.self_cognition == 'self-cognition'`: registered dataset names as attributes."""

from __future__ import annotations

from martlet.data.sources import dataset_registry
from martlet.errors import did_you_mean


class _DatasetNameMeta(type):
    def __getattr__(cls, attr: str) -> str:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for name in dataset_registry():
            if name.replace("-", "_").replace(".", "_") == attr:
                return name
        raise AttributeError(f"DatasetName has no '{attr}'.{did_you_mean(attr.replace('_', '-'), dataset_registry())}")

    def __dir__(cls) -> list[str]:
        return sorted(n.replace("-", "_").replace(".", "_") for n in dataset_registry())


class DatasetName(metaclass=_DatasetNameMeta):
    """Registered dataset names, spelled with '_' for '-'."""

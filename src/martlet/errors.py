"""One error class for everything a user can act on."""

from __future__ import annotations

import difflib
from typing import Iterable


class MartletError(Exception):
    """What went wrong, where (file:line, field) and what to do about it.

    The CLI prints it on one line without a traceback and exits with status 2.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, hint: str | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        field = f"field '{self.field}': " if self.field else ""
        hint = f" {self.hint}" if self.hint else ""
        return f"{where}{field}{self.message}{hint}"


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean: a, b?' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


class DatasetErrors(MartletError):
    """Every problem found in a data set: the first in full (file, line, field), then the next few, then a count."""

    SHOWN = 5

    def __init__(self, errors: list[MartletError]):
        first = errors[0]
        self.errors = list(errors)
        extra = ""
        if len(errors) > 1:
            lines = "".join(f"\n  {e}" for e in errors[1:self.SHOWN])
            rest = f"\n  ... and {len(errors) - self.SHOWN} more" if len(errors) > self.SHOWN else ""
            extra = f" [{len(errors)} problems in all]{lines}{rest}"
        super().__init__(first.message, file=first.file, line=first.line, field=first.field, hint=first.hint)
        self.extra = extra

    def __str__(self) -> str:
        return super().__str__() + getattr(self, "extra", "")


_missing_packages: list[str] | None = None


def require_package(module: str, message: str, *, field: str, hint: str | None = None) -> None:
    """A clear error when an optional package is absent (noted instead, inside `noting_missing_packages`)."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return
    if _missing_packages is not None:
        _missing_packages.append(module)
        return
    raise MartletError(message, field=field, hint=hint)


def noting_missing_packages():
    """A context in which `require_package` lists what is missing rather than failing (dry runs)."""
    import contextlib

    @contextlib.contextmanager
    def noting():
        global _missing_packages
        saved, _missing_packages = _missing_packages, []
        try:
            yield _missing_packages
        finally:
            _missing_packages = saved

    return noting()

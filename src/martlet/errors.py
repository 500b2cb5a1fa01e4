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

"""The argument reference (docs/<lang>/arguments.md), generated from the argument dataclasses so that
it cannot drift: `python -m martlet.docgen` rewrites it; a test fails when it is stale."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

from martlet.args.base import field_kind
from martlet.cli import COMMANDS

HEADER = {
    "en": "# Argument reference\n\nGenerated from the argument dataclasses by `python -m martlet.docgen`; "
          "do not edit by hand. Every argument is also shown by `martlet <command> --help`.\n",
    "zh": "# 参数参考\n\n由 `python -m martlet.docgen` 根据参数数据类自动生成，请勿手动编辑。"
          "每个参数也可以通过 `martlet <command> --help` 查看。\n",
}


def _class(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def render(lang: str = "en") -> str:
    parts = [HEADER[lang]]
    seen: dict[str, str] = {}
    for command, (_, args_cls, desc, _) in COMMANDS.items():
        if not args_cls:
            continue
        cls = _class(args_cls)
        if cls.__name__ in seen:
            parts.append(f"\n## `martlet {command}`\n\n{desc} Same arguments as `martlet {seen[cls.__name__]}`.\n")
            continue
        seen[cls.__name__] = command
        parts.append(f"\n## `martlet {command}` ({cls.__name__})\n\n{desc}\n")
        parts.append("\n| argument | type | default | description |\n| --- | --- | --- | --- |")
        for f in dataclasses.fields(cls):
            tp, _, is_list = field_kind(cls, f.name)
            kind = getattr(tp, "__name__", str(tp)) + (" list" if is_list else "")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            names = ", ".join(f"`--{n}`" for n in (f.name, *f.metadata.get("aliases", ())))
            text = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
            choices = f.metadata.get("choices")
            if choices:
                text += f" Choices: {', '.join(map(str, choices))}."
            parts.append(f"| {names} | {kind} | `{default!r}` | {text} |")
    return "\n".join(parts) + "\n"


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "docs")
    for lang in HEADER:
        path = os.path.join(root, lang, "arguments.md")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(render(lang))
        print(f"wrote {os.path.normpath(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

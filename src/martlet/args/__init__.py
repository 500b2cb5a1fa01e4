"""Flat, typed argument dataclasses; `base` turns them into a CLI and `--help`."""

from martlet.args.base import arg, format_help, parse_cli, to_dict
from martlet.args.eval import EvalArguments  # noqa: F401  (martlet eval)
from martlet.args.sft import PtArguments, SftArguments

__all__ = ["arg", "format_help", "parse_cli", "to_dict", "PtArguments", "SftArguments"]

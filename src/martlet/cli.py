"""`martlet <command> [--name value ...]`: each command is "module:function", imported only when run."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Sequence

from martlet.errors import MartletError, did_you_mean
from martlet.utils import collector_paused, frozen_heap

# command -> (entry point, arguments class for --help, one-line description, the extra it needs or None)
COMMANDS: dict[str, tuple[str, str | None, str, str | None]] = {
    "sft": ("martlet.train.sft:main", "martlet.args.sft:SftArguments", "Supervised fine-tuning (LoRA or full).", None),
    "pt": ("martlet.train.sft:pt_cli", "martlet.args.sft:PtArguments", "Continued pre-training on plain text.", None),
    "rlhf": ("martlet.train.rlhf:main", "martlet.args.rlhf:RLHFArguments",
             "Preference training (--rlhf_type dpo, orpo, simpo, cpo, kto), grpo or rm.", None),
    "dpo": ("martlet.train.rlhf:dpo_cli", "martlet.args.rlhf:DPOArguments", "Direct Preference Optimization.", None),
    "orpo": ("martlet.train.rlhf:orpo_cli", "martlet.args.rlhf:ORPOArguments",
             "Odds Ratio Preference Optimization (no reference model).", None),
    "grpo": ("martlet.train.rlhf:grpo_cli", "martlet.args.rlhf:GRPOArguments", "GRPO with reward functions.", None),
    "infer": ("martlet.infer.main:main", "martlet.args.infer:InferArguments",
              "Chat with a model or checkpoint, or evaluate it on a dataset.", None),
    "eval": ("martlet.evaluation.main:main", "martlet.args.eval:EvalArguments", "Score a model or checkpoint.", None),
    "merge-lora": ("martlet.infer.main:merge_cli", "martlet.args.infer:InferArguments",
                   "Merge a LoRA checkpoint into its base model (<ckpt_dir>-merged).", None),
    "export": ("martlet.export.main:main", "martlet.args.export:ExportArguments",
               "Merge LoRA, quantize (GGUF for llama.cpp/Ollama, bnb, GPTQ, AWQ), push to a hub.", None),
    "deploy": ("martlet.serve.main:main", "martlet.args.serve:DeployArguments",
               "Serve a model or checkpoint over an OpenAI-compatible HTTP API.", "serve"),
    "app-ui": ("martlet.ui.app:main", "martlet.args.serve:AppUIArguments",
               "Chat with a model or checkpoint in the browser (gradio).", "ui"),
    "web-ui": ("martlet.ui.webui:main", "martlet.args.serve:WebUIArguments",
               "Train, watch, chat and export in the browser (gradio).", "ui"),
    "download-embedded": ("martlet.models.download:main", None,
                          "Fetch the embedded SmolLM2-135M-Instruct (98 MB) into Martlet's cache.", None),
    "list-models": ("martlet.commands:list_models", None, "List the registered model types.", None),
    "list-datasets": ("martlet.commands:list_datasets", None, "List the registered datasets.", None),
    "list-templates": ("martlet.commands:list_templates", None, "List the named chat templates.", None),
}
# extra of pyproject.toml -> the modules a command of that extra imports
EXTRAS: dict[str, tuple[str, ...]] = {"serve": ("fastapi", "uvicorn"), "ui": ("gradio",)}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def check_extra(command: str) -> None:
    """Stop before anything loads when the command's extra is not installed, naming the pip command."""
    extra = COMMANDS[command][3]
    missing = [name for name in EXTRAS.get(extra or "", ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise MartletError(f"'martlet {command}' needs {' and '.join(missing)}, not installed here.",
                           hint=f"Install it with: pip install 'martlet[{extra}]'")


def usage() -> str:
    lines = ["usage: martlet <command> [--name value ...]", "", "commands:"]
    lines += [f"  {name:<17} {desc}" for name, (_, _, desc, _) in COMMANDS.items()]
    lines += ["", "`martlet <command> --help` lists a command's arguments."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a reader that went away (`martlet sft --help | head`) ends it quietly, the Unix way."""
    try:
        return run(argv)
    except BrokenPipeError:
        # nothing more can be written: point stdout at /dev/null so the interpreter's last flush stays silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a process killed by SIGPIPE


def run(argv: Sequence[str] | None = None) -> int:
    whole_process = argv is None  # the `martlet` program itself, not a call from other Python code
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from martlet import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"martlet: error: unknown command '{command}'.{did_you_mean(command, COMMANDS)}", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    entry, args_cls, _, _ = COMMANDS[command]
    if args_cls and any(a in ("-h", "--help") for a in rest):
        from martlet.args.base import format_help

        print(format_help(_load(args_cls), f"martlet {command}"))
        return 0
    try:
        from martlet.dryrun import dry_run, wants_dry_run
        from martlet.launch import close_process_group, launch, preload_allocator, wants_launch

        if args_cls and wants_dry_run(rest):  # check a command (a script for other hardware) without running it
            return dry_run(command, _load(args_cls), rest)
        check_extra(command)
        if whole_process:  # (run again with it in place, or returns: none to preload, or in place already)
            preload_allocator(command, rest)
        if wants_launch(command):  # NPROC_PER_NODE / NNODES: the same command under torchrun
            return launch(command, rest)
        with collector_paused():  # the command's libraries import without the collector's full passes ...
            function = _load(entry)
        try:
            with frozen_heap():  # ... nor meet them later (given back at the end, for the interpreter's exit)
                return int(function(rest) or 0)
        finally:
            close_process_group()
    except MartletError as exc:
        print(f"martlet: error: {exc}", file=sys.stderr)
        if os.environ.get("MARTLET_TRACEBACK") == "1":
            raise
        return 2
    except KeyboardInterrupt:
        print("martlet: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

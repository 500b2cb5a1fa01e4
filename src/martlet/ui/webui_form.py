"""The training form of `martlet web-ui` as plain data (no gradio): the CLI's defaults, the argv and
command line a form stands for, the same validation as the CLI, and a preview of the data as Martlet reads it.

A form is a dict of argument names to values. Only values that differ from the command's defaults go into
the argv, so the command line shown on the page is the short one a person would type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from typing import Any

from martlet.args.base import Arguments, parse_cli
from martlet.args.rlhf import DPOArguments, GRPOArguments, ORPOArguments, RLHFArguments
from martlet.args.sft import PtArguments, SftArguments
from martlet.custom import apply_custom_registrations
from martlet.data.preference import load_preference_rows
from martlet.data.preprocess import conversation_rows
from martlet.dryrun import looks_like_hub_id, on_hub
from martlet.errors import MartletError
from martlet.models.registry import get_model_info
from martlet.train.grpo_data import ANSWER_REWARDS, grpo_rows, with_instruction

# the commands the page starts, and those a run found on disk may have been started with
METHODS = {"sft": SftArguments, "dpo": DPOArguments, "orpo": ORPOArguments, "grpo": GRPOArguments}
COMMANDS = {**METHODS, "pt": PtArguments, "rlhf": RLHFArguments}
# the hyperparameters on the page, in the order of the command line
HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "max_steps", "batch_size", "max_length", "lora_rank",
                   "lora_alpha", "eval_steps", "save_steps", "logging_steps")
NOT_REPEATED = ("resume_from_checkpoint", "hub_token")  # left out when a saved run is turned back into a command


def defaults(command: str) -> dict[str, Any]:
    """Every argument of `martlet <command>` with its default, read from the argument dataclass."""
    values = {}
    for f in dataclasses.fields(COMMANDS[command]):
        missing = f.default is dataclasses.MISSING
        values[f.name] = f.default_factory() if missing else f.default  # type: ignore[misc]
    return values


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple)) and not value)


def _token(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, dict):
        return json.dumps(value)  # --training_args
    return str(value)


def build_argv(command: str, form: dict[str, Any], extra: str = "") -> list[str]:
    """`--name value ...` for the form's values that differ from the defaults, then the extra arguments."""
    base = defaults(command)
    argv: list[str] = []
    for name, value in form.items():
        if name not in base:
            raise MartletError(f"`martlet {command}` has no argument '{name}'.")
        if _blank(value) or value == base[name]:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{name}", *(_token(v) for v in values)]
    try:
        argv += shlex.split(extra or "")
    except ValueError as exc:
        raise MartletError(f"cannot read the extra arguments: {exc}.", field="extra arguments") from None
    return argv


def command_line(command: str, argv: list[str]) -> str:
    """The shell command a person would type for the same run."""
    return shlex.join(["martlet", command, *argv])


def saved_command(saved: dict[str, Any], run_command: str | None) -> tuple[str, list[str]]:
    """(command, argv) that repeats a run from its `sft_args.json` and the command in `martlet_run.json`."""
    command = run_command if run_command in COMMANDS else "rlhf" if saved.get("rlhf_type") else "sft"
    known = defaults(command)
    first = [k for k in ("rlhf_type", "model_type", "model_id_or_path", "sft_type", "dataset", "val_dataset",
                         *HYPERPARAMETERS) if k in saved]  # in the order of the page's command
    names = first + [k for k in saved if k not in first]
    return command, build_argv(command, {k: saved[k] for k in names if k in known and k not in NOT_REPEATED})


def check(command: str, argv: list[str]) -> Any:
    """The validated arguments of `martlet <command> argv`; MartletError for anything the run would refuse
    at once: a bad value, a model folder that is not there, a dataset that does not resolve or parse."""
    if command not in COMMANDS:
        raise MartletError(f"unknown method '{command}'.", hint=f"Choose one of {', '.join(METHODS)}.")
    args = parse_cli(COMMANDS[command], argv).validate()
    apply_custom_registrations(args)  # --custom_dataset_info / --custom_register_path in the extra arguments
    check_model(args.model_id_or_path)
    for spec in [*args.dataset, *args.val_dataset]:
        preview_rows(command, spec, args)
    return args


def check_model(name: str | None) -> None:
    """A local folder must exist and hold a model; a name must be a registered type (a hub id is downloaded
    by the run)."""
    if not name:
        return  # the embedded SmolLM2
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise MartletError("this folder has no config.json: it is not a model folder.", file=path,
                               field="model_id_or_path")
        return
    if looks_like_hub_id(name):
        return
    if os.sep in name or name.startswith((".", "~")):
        raise MartletError("model folder not found.", file=path, field="model_id_or_path",
                           hint="Type a folder that exists, or pick a registered model type.")
    try:
        get_model_info(name)
    except MartletError as exc:
        raise MartletError(exc.message, field="model_id_or_path", hint=exc.hint) from None


def preview_rows(command: str, spec: str, args: Arguments | None = None) -> list[dict[str, Any]]:
    """The rows of one --dataset entry as training reads them ([] for a hub set): conversations for sft,
    prompt/chosen/rejected pairs for the preference methods, prompts with the reward functions' columns for grpo."""
    if on_hub(spec):
        return []
    seed = getattr(args, "dataset_seed", 42)
    names = dict(model_name=getattr(args, "model_name", ()), model_author=getattr(args, "model_author", ()))
    if command in ("sft", "pt"):
        return conversation_rows(spec, seed=seed, **names)
    if command == "grpo":
        asks = any(name in ANSWER_REWARDS for name in getattr(args, "reward_funcs", ANSWER_REWARDS))
        return [{"where": spec, **(with_instruction(row) if asks else row)} for row in grpo_rows(spec, seed=seed)]
    return load_preference_rows(spec, kind="kto" if getattr(args, "rlhf_type", "") == "kto" else "pair", seed=seed,
                                **names)


def _turns(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def preview_table(rows: list[dict[str, Any]], limit: int = 5) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the first `limit` rows, one column per part of the row; `where` as file name:line."""
    rows = [{**r, "where": os.path.basename(r["where"])} for r in rows[:limit]]
    if rows and "chosen" in rows[0]:
        return (["where", "prompt", "chosen", "rejected"],
                [[r["where"], _turns(r["prompt"]), r["chosen"], r["rejected"]] for r in rows])
    if rows and "prompt" in rows[0] and "chosen" not in rows[0] and "completion" not in rows[0]:  # grpo
        return (["where", "prompt", "columns"],
                [[r["where"], _turns(r["prompt"]), json.dumps({k: v for k, v in r.items() if k not in ("where", "prompt")},
                                                              ensure_ascii=False)] for r in rows])
    if rows and "completion" in rows[0]:
        return (["where", "prompt", "completion", "label"],
                [[r["where"], _turns(r["prompt"]), r["completion"], str(r["label"])] for r in rows])
    return ["where", "conversation"], [[r["where"], _turns(r["messages"]) if "messages" in r else r["text"]]
                                       for r in rows]

"""`MARTLET_DRY_RUN=1 martlet <command> ...` (or `--dry_run true`): parse and validate the arguments, build the
full configuration (derived values, the torchrun launch, DeepSpeed / FSDP configs, what the model needs) and
print it as JSON; nothing is downloaded, trained or written.

Missing optional packages (deepspeed, bitsandbytes, ...) are listed under "missing_packages" instead of
failing, so a script meant for a GPU machine can be checked anywhere. Every other problem is the same
MartletError the real run would raise.

For `martlet sft`, when the model's tokenizer and the data are on this machine, it also prints the first
training row as the template encodes it, with the spans that carry loss marked (Template.show).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Any, Sequence

from martlet.args.base import Arguments, parse_cli, to_dict
from martlet.custom import apply_custom_registrations
from martlet.data.preprocess import train_val_rows
from martlet.data.sources import dataset_registry, parse_spec
from martlet.errors import MartletError, noting_missing_packages
from martlet.launch import TRAINING_COMMANDS, torchrun_command, wants_launch
from martlet.models.embedded import EMBEDDED_MODEL_TYPE, cache_dir
from martlet.models.loader import load_tokenizer, resolve_model
from martlet.models.registry import get_model_info
from martlet.templates import Template, get_template, resolve_style
from martlet.train.deepspeed import resolve_deepspeed
from martlet.train.fsdp import resolve_fsdp


def wants_dry_run(argv: list[str]) -> bool:
    """True for MARTLET_DRY_RUN=1 or a `--dry_run [true|false]` flag (which is taken out of argv)."""
    wanted = os.environ.get("MARTLET_DRY_RUN", "").lower() in ("1", "true", "yes")
    if "--dry_run" in argv:
        i = argv.index("--dry_run")
        value = argv.pop(i + 1) if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true"
        argv.pop(i)
        wanted = value.lower() in ("1", "true", "yes")
    return wanted


def dry_run(command: str, args_cls: type, argv: Sequence[str]) -> int:
    args = parse_cli(args_cls, list(argv))
    with noting_missing_packages() as missing:
        if hasattr(args, "validate"):
            args.validate()
        plan: dict[str, Any] = {"command": command, "arguments": to_dict(args), **_derived(command, args)}
    model = _model_info(args)
    if model:
        plan["model"] = model
        missing += [r for r in model.get("requires", []) if not _installed(r)]
    plan["missing_packages"] = sorted(set(missing))
    print(json.dumps(plan, indent=1, ensure_ascii=False, default=str))
    if command == "sft":
        print(first_row_mask(args))
    print(f"martlet: dry run of `{command}`: arguments valid"
          + (f"; this machine lacks {', '.join(plan['missing_packages'])}" if plan["missing_packages"] else ""))
    return 0


def _derived(command: str, args: Arguments) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if command in TRAINING_COMMANDS:
        world = int(os.environ.get("NPROC_PER_NODE", "1") or 1) * int(os.environ.get("NNODES", "1") or 1)
        out["derived"] = {"learning_rate": args.effective_learning_rate(),
                          "gradient_accumulation_steps": args.effective_grad_accum(world),
                          "save_steps": args.effective_save_steps(), "world_size": world,
                          "global_batch_size": args.batch_size * world * args.effective_grad_accum(world)}
        if hasattr(args, "effective_padding_free"):
            out["derived"]["padding_free"] = args.effective_padding_free()
        out["launch"] = torchrun_command(command, []) if wants_launch(command) else None
        if args.deepspeed:
            out["deepspeed"] = resolve_deepspeed(args.deepspeed)
        if args.fsdp:
            out["fsdp"] = resolve_fsdp(args.fsdp, args.fsdp_config)
        if getattr(args, "quantization_bit", 0):
            out["quantization"] = {"bits": args.quantization_bit, "quant_type": args.bnb_4bit_quant_type,
                                   "double_quant": args.bnb_4bit_use_double_quant,
                                   "compute_dtype": args.bnb_4bit_comp_dtype}
    return out


def _model_info(args: Arguments) -> dict[str, Any] | None:
    """What the registry says about the model (no download)."""
    model_type = getattr(args, "model_type", None)
    if not model_type:
        return None
    info = get_model_info(model_type)
    requires = [r for r in info.requires if not r.startswith("transformers")]
    return {"model_type": model_type, "hf_id": info.hf_id, "ms_id": info.ms_id, "template": info.template,
            "quantization": info.quantization, "requires": requires,
            "needs_gpu": bool(info.quantization and info.quantization.startswith(("gptq", "awq")))}


def _installed(requirement: str) -> bool:
    name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].replace("-", "_")
    return importlib.util.find_spec(name) is not None


# the first training row, loss spans marked -------------------------------------------------------------------
def on_hub(spec: str) -> bool:
    """True for a dataset that the run downloads (a registered hub set or a hub id): a dry run does not read it."""
    name, _ = parse_spec(spec)
    registry = dataset_registry()
    entry = registry.get(name) or registry.get(name.replace("_", "-"))
    if entry is not None:
        return not (entry.get("builtin") or entry.get("path") or entry.get("rows") is not None)
    return not os.path.exists(os.path.expanduser(name)) and looks_like_hub_id(name)


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not os.path.exists(parts[0]))


def local_template(args: Arguments) -> Template:
    """The template the run would encode with (its tokenizer, --template_type, --system, --max_length),
    from files on this machine; MartletError when the model would first be downloaded (or converted)."""
    apply_custom_registrations(args)
    embedded = (args.model_id_or_path in (None, "", EMBEDDED_MODEL_TYPE)
                and args.model_type in (None, EMBEDDED_MODEL_TYPE))
    if embedded and not os.path.isdir(os.path.join(cache_dir(), "models", EMBEDDED_MODEL_TYPE)):
        raise MartletError("the embedded model is converted on the first real run.")
    spec = resolve_model(args.model_type, args.model_id_or_path, check_model_is_latest=False,
                         revision=args.model_revision, hub_token=args.hub_token)  # the local cache only
    tokenizer = load_tokenizer(spec.model_dir, trust_remote_code=args.trust_remote_code)
    return get_template(args.template_type, tokenizer, args.system, args.max_length, args.truncation_strategy,
                        fallback=spec.template_type)


def first_row_mask(args: Arguments, style: str = "auto") -> str:
    """The first training row as the template encodes it, the spans that carry loss marked; or a line
    saying why it cannot be shown without downloading."""
    hub = [spec for spec in (*args.dataset, *args.val_dataset) if on_hub(spec)]
    if hub:
        return f"martlet: loss mask not shown: {hub[0]} is on the hub (the run downloads it)."
    try:
        template = local_template(args)
    except MartletError as exc:
        return f"martlet: loss mask not shown: {exc}"
    train, _ = train_val_rows(args)
    if not train:
        return "martlet: loss mask not shown: no training rows."
    row, style = train[0], resolve_style(style)
    shown = template.show(row["text"] if row.get("text") is not None else row["messages"], style=style).rstrip("\n")
    legend = {"ansi": "the green spans", "plain": "the «…» spans", "html": "the <mark> spans"}[style]
    return (f"martlet: the first training row ({row.get('where', 'row 1')}) as template "
            f"'{template.template_type}' encodes it; {legend} carry loss:\n{shown}")

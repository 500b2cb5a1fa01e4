"""`MARTLET_DRY_RUN=1 martlet <command> ...` (or `--dry_run true`): parse and validate the arguments, build the
full configuration (derived values, the torchrun launch, DeepSpeed / FSDP configs, what the model needs) and
print it as JSON; nothing is downloaded, loaded, trained or written.

Missing optional packages (deepspeed, bitsandbytes, ...) are listed under "missing_packages" instead of
failing, so a script meant for a GPU machine can be checked anywhere. Every other problem is the same
MartletError the real run would raise.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from martlet.errors import noting_missing_packages


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
    from martlet.args.base import parse_cli, to_dict

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
    print(f"martlet: dry run of `{command}`: arguments valid"
          + (f"; this machine lacks {', '.join(plan['missing_packages'])}" if plan["missing_packages"] else ""))
    return 0


def _derived(command: str, args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    from martlet.launch import TRAINING_COMMANDS, torchrun_command, wants_launch

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
            from martlet.train.deepspeed import resolve_deepspeed

            out["deepspeed"] = resolve_deepspeed(args.deepspeed)
        if args.fsdp:
            from martlet.train.fsdp import resolve_fsdp

            out["fsdp"] = resolve_fsdp(args.fsdp, args.fsdp_config)
        if getattr(args, "quantization_bit", 0):
            out["quantization"] = {"bits": args.quantization_bit, "quant_type": args.bnb_4bit_quant_type,
                                   "double_quant": args.bnb_4bit_use_double_quant,
                                   "compute_dtype": args.bnb_4bit_comp_dtype}
    return out


def _model_info(args: Any) -> dict[str, Any] | None:
    """What the registry says about the model (no download)."""
    model_type = getattr(args, "model_type", None)
    if not model_type:
        return None
    from martlet.models.registry import get_model_info

    info = get_model_info(model_type)
    requires = [r for r in info.requires if not r.startswith("transformers")]
    return {"model_type": model_type, "hf_id": info.hf_id, "ms_id": info.ms_id, "template": info.template,
            "quantization": info.quantization, "requires": requires,
            "needs_gpu": bool(info.quantization and info.quantization.startswith(("gptq", "awq")))}


def _installed(requirement: str) -> bool:
    import importlib.util
    import re

    name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].replace("-", "_")
    return importlib.util.find_spec(name) is not None

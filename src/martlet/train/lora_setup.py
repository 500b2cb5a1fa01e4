"""LoRA set-up of a model about to be trained (`martlet sft`, `martlet rlhf`): the adapters wrapped around the
modules the arguments name, with peft doing the work. (Loading a trained adapter onto a model, the spec's
`Swift.from_pretrained`, is `martlet.tuners`.)"""

from __future__ import annotations

from typing import Any

from martlet.args.lora import TunerArguments
from martlet.errors import MartletError
from martlet.utils import libraries_quietly


def lora_targets(requested: list[str], default: tuple[str, ...] | None) -> str | list[str]:
    """DEFAULT -> the model type's usual targets; ALL -> every linear layer (peft's 'all-linear')."""
    upper = [t.upper().replace("ALL-LINEAR", "ALL") for t in requested]  # ms-swift 3 / peft spelling
    if upper == ["ALL"] or (upper == ["DEFAULT"] and not default):
        return "all-linear"
    if upper == ["DEFAULT"]:
        return list(default or ())
    if "ALL" in upper or "DEFAULT" in upper:
        raise MartletError("ALL and DEFAULT cannot be mixed with module names.", field="lora_target_modules")
    return list(requested)


def apply_lora(model: Any, args: TunerArguments, default_targets: tuple[str, ...] | None):
    """Wrap `model` in a peft LoRA model as the arguments say; trainable weights stay in fp32."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(args.lora_target_modules, default_targets)
    if isinstance(targets, list):
        names = {name.split(".")[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise MartletError(f"the model has no modules named {', '.join(missing)}.", field="lora_target_modules",
                               hint="Use ALL for every linear layer, or names such as q_proj, v_proj.")
    config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets,
                        modules_to_save=args.lora_modules_to_save or None, use_rslora=args.use_rslora,
                        use_dora=args.use_dora)
    with libraries_quietly():
        model = get_peft_model(model, config)
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total

"""The TrainingArguments keywords every training command shares (SFT's TrainingArguments, trl's DPOConfig and
KTOConfig), from Martlet's arguments."""

from __future__ import annotations

import os
from typing import Any

from martlet.args import SftArguments
from martlet.train.deepspeed import resolve_deepspeed
from martlet.train.fsdp import resolve_fsdp
from martlet.train.model_setup import uses_gradient_checkpointing


def training_kwargs(args: SftArguments, run_dir: str, dtype: str, device: str, has_eval: bool,
                    model: Any) -> dict[str, Any]:
    """TrainingArguments keywords shared by every training command (also fed to trl's DPOConfig/KTOConfig); the
    pass-through fields (--training_args, --optim, ...) on top: none is one of Martlet's own arguments, and one
    that Martlet derives here (e.g. --warmup_steps, else from --warmup_ratio) is the user's to replace."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    checkpointing = uses_gradient_checkpointing(args, device, model.config)
    report_to = [r for r in args.report_to if r != "none"] or "none"
    kwargs = dict(
        output_dir=run_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        gradient_accumulation_steps=args.effective_grad_accum(world_size),
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        learning_rate=args.effective_learning_rate(),
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.effective_save_steps(),
        save_total_limit=args.save_total_limit,
        save_only_model=args.save_only_model,
        metric_for_best_model="loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu=device == "cpu",
        seed=args.seed,
        data_seed=args.seed,
        report_to=report_to,
        dataloader_num_workers=args.dataloader_num_workers,
        disable_tqdm=args.disable_tqdm,
        remove_unused_columns=False,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        hub_token=args.hub_token,
        hub_private_repo=args.hub_private_repo,
        deepspeed=resolve_deepspeed(args.deepspeed) if args.deepspeed else None,
        ddp_find_unused_parameters=False,  # LoRA and full training use every trainable weight
        **({"fsdp": True, "fsdp_config": resolve_fsdp(args.fsdp, args.fsdp_config)} if args.fsdp else {}),
    )
    return {**kwargs, **args.training_args}

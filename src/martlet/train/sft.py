"""`martlet sft` / `sft_main` and `martlet pt` / `pt_main`: read top to bottom.

parse -> validate -> model files -> tokenizer and template -> data -> model (+LoRA) -> run folder ->
Trainer -> train -> curves -> result.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from martlet import patches
from martlet.args import PtArguments, SftArguments, parse_cli
from martlet.data.preprocess import encode_rows, train_val_rows
from martlet.launch import main_process_first
from martlet.models.loader import load_model
from martlet.templates import get_template
from martlet.utils import setup_logging

logger = logging.getLogger("martlet")


def sft_main(args: SftArguments | Sequence[str] | None = None, *, mode: str = "sft") -> dict[str, Any]:
    """Fine-tune and return {best_model_checkpoint, last_model_checkpoint, log_history, ...}."""
    setup_logging()
    cls = PtArguments if mode == "pt" else SftArguments
    if not isinstance(args, SftArguments):
        args = parse_cli(cls, args)
    args.validate()
    from martlet.train.run import prepare_run

    device, dtype, spec, tokenizer = prepare_run(args)
    template = get_template(args.template_type, tokenizer, args.system, args.max_length, args.truncation_strategy,
                            fallback=spec.template_type)
    tokenizer.chat_template = template.chat_template  # saved with every checkpoint

    train_rows, val_rows = train_val_rows(args)
    encode = dict(mode=mode, num_proc=args.preprocess_num_proc, cache=args.load_from_cache_file)
    with main_process_first():  # under torchrun, rank 0 tokenizes and caches; the others read the cache
        train_set, train_stats = encode_rows(train_rows, template, **encode)
        val_set, val_stats = encode_rows(val_rows, template, what="val", **encode) if val_rows else (None, None)

    model = _load_for_training(args, spec, dtype, device)
    from martlet.train.outputs import run_info
    from martlet.train.run import open_run_dir, resume_checkpoint, train_and_report

    checkpoint = resume_checkpoint(args)
    info = run_info(args, spec, template, command=mode)
    info.update(dtype=dtype, data={"train": train_stats, "val": val_stats})
    run_dir = open_run_dir(args, spec.model_type, info, checkpoint)
    trainer = _build_trainer(args, model, tokenizer, train_set, val_set, run_dir, dtype, device, info)
    result = train_and_report(trainer, args, run_dir, info, checkpoint)
    return result


def pt_main(args: PtArguments | Sequence[str] | None = None) -> dict[str, Any]:
    """Continued pre-training: loss on every token of plain text (or of whole rendered conversations)."""
    return sft_main(args, mode="pt")


def _load_for_training(args: SftArguments, spec: Any, dtype: str, device: str):
    """The model in its training precision: fp32 master weights on a CPU (bf16 runs under autocast)."""
    from transformers import set_seed

    from martlet.train.tuners import apply_lora, count_parameters

    set_seed(args.seed)  # LoRA initialisation is random too

    quant = None
    if args.quantization_bit:
        from martlet.models.quant import bnb_config

        quant = bnb_config(args, dtype)
    # LoRA: the frozen base weights in the compute dtype (half the memory, no casting at every step; the
    # adapters stay fp32); full training on a CPU keeps fp32 master weights under bf16 autocast.
    lora_half = args.sft_type == "lora" and (dtype == "bf16" or device == "cuda")
    load_dtype = dtype if lora_half or (device == "cuda" and dtype == "bf16") else "fp32"
    model = load_model(spec, dtype=load_dtype, trust_remote_code=args.trust_remote_code, attn_impl=_attn(args, device),
                       quantization_config=quant, **_placement(args, device, quant is not None))
    model.config.use_cache = False
    checkpointing = uses_gradient_checkpointing(args, device, model.config)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if args.sft_type == "lora":
        if checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, args, spec.info.lora_target_modules if spec.info else None)
        if lora_half and device == "cpu":
            # bf16 activations go straight into the fp32 adapters under autocast, instead of peft casting them
            # to fp32 and autocast back to bf16 (two copies per adapter per pass: ~19% of a step on a CPU)
            for module in model.modules():
                if hasattr(module, "lora_A"):
                    patches.patch_attribute("peft_input_cast_off", module, "cast_input_dtype_enabled", False)
        if not (getattr(args, "deepspeed", None) or getattr(args, "fsdp", None)):  # (sharded weights: peft's path)
            from martlet.train.kernels import fuse_lora

            logger.debug("LoRA layers fused: %d", fuse_lora(model))
    if device == "cpu" and quant is None:  # RMSNorm and SwiGLU in one native pass each (train/native.py)
        from martlet.train.native import fuse_native

        logger.debug("modules on native kernels: %d", fuse_native(model))
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def _placement(args: SftArguments, device: str, quantized: bool) -> dict[str, Any]:
    """Where the weights go: `device_map` (and `max_memory`) for `load_model`.

    One process that sees several GPUs spreads the layers over them (the spec's *_mp scripts). Under torchrun
    with more GPUs than processes on the node (and a multiple of them), each process gets its own group of GPUs
    (model parallel inside the group, DDP across groups): see `model_parallel_gpus`. Otherwise each process
    keeps its whole model on its own GPU."""
    import torch

    from martlet.launch import is_distributed

    if device != "cuda":
        return {}
    count = torch.cuda.device_count()
    if not is_distributed():
        if count > 1:
            logger.info("model parallel: layers spread over %d GPUs (device_map=auto)", count)
            return {"device_map": "auto"}
        return {"device_map": "auto"} if quantized else {}
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = model_parallel_gpus(count, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if len(gpus) > 1 and (quantized or getattr(args, "deepspeed", None) or getattr(args, "fsdp", None)):
        logger.warning("%d GPUs per process, but %s keeps one GPU per process: using GPU %d only.", len(gpus),
                       "a quantized model" if quantized else "DeepSpeed/FSDP", local_rank)
        gpus = [local_rank]
    if len(gpus) == 1:  # quantized weights load straight onto the process's own GPU
        return {"device_map": {"": local_rank}} if quantized else {}
    # accelerate refuses a multi-GPU model under DDP unless told; DDP then runs with device_ids=None
    patches.patch_environment("accelerate_bypass_device_map", "ACCELERATE_BYPASS_DEVICE_MAP", "true")
    logger.info("model parallel x DDP: local rank %d spreads its layers over GPUs %s", local_rank, gpus)
    memory = {i: torch.cuda.mem_get_info(i)[1] for i in gpus}
    return {"device_map": "auto", "max_memory": memory}


def model_parallel_gpus(count: int, local_rank: int, local_world_size: int) -> list[int]:
    """The GPUs of one process when a node's `count` GPUs are shared by `local_world_size` processes: local rank r
    gets r, r + n, r + 2n, ... (n processes), so its first GPU is cuda:r, the device DDP and the Trainer give it.
    One GPU each unless the GPUs divide evenly into groups of two or more."""
    if count <= local_world_size or count % local_world_size:
        if count > local_world_size:
            logger.warning("%d GPUs do not divide among %d processes: one GPU per process.", count,
                           local_world_size)
        return [local_rank]
    return list(range(local_rank, count, local_world_size))


def uses_gradient_checkpointing(args: SftArguments, device: str, config: Any) -> bool:
    """--gradient_checkpointing, or when not given: on, except on a CPU where a step's activations take under an
    eighth of the memory (recomputing them there costs a quarter of the step time and saves nothing needed)."""
    if args.gradient_checkpointing is not None:
        return args.gradient_checkpointing
    if device != "cpu":
        return True
    hidden = getattr(config, "hidden_size", None) or 4096
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or 32
    tokens = args.batch_size * args.max_length
    activations = tokens * layers * (34 * hidden + 6 * inter)  # bytes kept for backward, roughly, in 16-bit
    return activations > _memory_bytes() / 8


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 16 * 2**30


def _attn(args: SftArguments, device: str) -> str | None:
    if args.use_flash_attn:
        from martlet.models.attention import check_flash_attn

        check_flash_attn()
        return "flash_attention_2"
    if args.attn_impl is None and device == "cpu":
        from martlet.train.attention import register

        return register()  # padding-free rows: each sample attends on its own
    return args.attn_impl


def _build_trainer(args: SftArguments, model: Any, tokenizer: Any, train_set: Any, val_set: Any, run_dir: str,
                   dtype: str, device: str, info: dict[str, Any]):
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from martlet.train.trainer import MartletTrainer

    from martlet.train.batching import PaddingFreeCollator, pack_dataset
    from martlet.train.loss import lean_loss_supported

    kwargs = _training_kwargs(args, run_dir, dtype, device, val_set is not None, model)
    kwargs.update(prediction_loss_only=True, torch_compile=args.torch_compile, use_liger_kernel=args.use_liger_kernel)
    if args.group_by_length and not args.packing:
        kwargs["train_sampling_strategy"] = "group_by_length"
    training_args = TrainingArguments(**kwargs)
    if args.effective_padding_free():  # bf16 on a CPU: rows in steps of 64 tokens (see PaddingFreeCollator)
        from martlet.models.dtype import torch_dtype
        from martlet.train.kernels import shape_multiple

        collator = PaddingFreeCollator(shape_multiple(device, torch_dtype(dtype)), tokenizer.pad_token_id or 0)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    if args.packing:
        before = len(train_set)
        train_set = pack_dataset(train_set, args.max_length, seed=args.seed)
        logger.info("packing: %d samples -> %d rows of up to %d tokens (%.1f%% full)", before, len(train_set),
                    args.max_length, 100 * sum(train_set["length"]) / max(1, len(train_set) * args.max_length))
    train_set = train_set.remove_columns(["length"])  # (length grouping measures input_ids itself)
    val_set = val_set.remove_columns(["length"]) if val_set is not None else None
    trainer = MartletTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=val_set,
                             data_collator=collator, processing_class=tokenizer,
                             callbacks=_callbacks(args, info, run_dir, val_set is not None))
    trainer.lean_loss = args.lean_loss and not args.use_liger_kernel and lean_loss_supported(model)
    return trainer


def _training_kwargs(args: SftArguments, run_dir: str, dtype: str, device: str, has_eval: bool,
                     model: Any) -> dict[str, Any]:
    """TrainingArguments keywords shared by every training command (also fed to trl's DPOConfig/KTOConfig)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    checkpointing = uses_gradient_checkpointing(args, device, model.config)
    report_to = [r for r in args.report_to if r != "none"] or "none"
    return dict(
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
        deepspeed=_deepspeed_config(args.deepspeed),
        ddp_find_unused_parameters=False,  # LoRA and full training use every trainable weight
        **_fsdp_kwargs(args),
    )


def _callbacks(args: SftArguments, info: dict[str, Any], run_dir: str, has_eval: bool) -> list[Any]:
    from martlet.train.callbacks import FinalStep, JsonlLogger, RunFilesInCheckpoint

    return [JsonlLogger(os.path.join(run_dir, "logging.jsonl")), RunFilesInCheckpoint(args, info), FinalStep(has_eval)]


def _fsdp_kwargs(args: SftArguments) -> dict[str, Any]:
    if not args.fsdp:
        return {}
    from martlet.train.fsdp import resolve_fsdp

    return {"fsdp": True, "fsdp_config": resolve_fsdp(args.fsdp, args.fsdp_config)}


def _deepspeed_config(name: str | None):
    if not name:
        return None
    from martlet.train.deepspeed import resolve_deepspeed

    return resolve_deepspeed(name)


def main(argv: Sequence[str] | None = None) -> int:
    return 130 if sft_main(argv)["interrupted"] else 0


def pt_cli(argv: Sequence[str] | None = None) -> int:
    return 130 if pt_main(argv)["interrupted"] else 0

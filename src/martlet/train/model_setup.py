"""The model a training command trains: loaded in its training precision, placed on its GPUs, quantized and
wrapped in LoRA as the arguments say, its layers on the fused kernels where they apply."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from peft import prepare_model_for_kbit_training
from transformers import set_seed

from martlet import patches
from martlet.args import SftArguments
from martlet.launch import is_distributed
from martlet.models.attention import check_flash_attn
from martlet.models.loader import ModelSpec, load_model
from martlet.models.quant import bnb_config
from martlet.train import varlen_attention
from martlet.train.fused_layer import fuse_decoder_layers
from martlet.train.kernels import fuse_lora
from martlet.train.lora_setup import apply_lora, count_parameters
from martlet.train.native import fuse_native
from martlet.utils import libraries_quietly

logger = logging.getLogger("martlet")


def load_for_training(args: SftArguments, spec: ModelSpec, dtype: str, device: str) -> Any:
    """The model in its training precision: fp32 master weights on a CPU (bf16 runs under autocast)."""
    set_seed(args.seed)  # LoRA initialisation is random too
    quant = bnb_config(args, dtype) if args.quantization_bit else None
    # LoRA: the frozen base weights in the compute dtype (half the memory, no casting at every step; the
    # adapters stay fp32); full training on a CPU keeps fp32 master weights under bf16 autocast.
    lora_half = args.sft_type == "lora" and (dtype == "bf16" or device == "cuda")
    load_dtype = dtype if lora_half or (device == "cuda" and dtype == "bf16") else "fp32"
    model = load_model(spec, dtype=load_dtype, trust_remote_code=args.trust_remote_code,
                       attn_impl=attention_implementation(args, device), quantization_config=quant,
                       **placement(args, device, quant is not None))
    model.config.use_cache = False
    checkpointing = uses_gradient_checkpointing(args, device, model.config)
    if quant is not None:
        with libraries_quietly():  # (peft asks transformers deprecated questions)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    if args.sft_type == "lora":
        model = _with_lora(model, args, spec, checkpointing, cpu_bf16=lora_half and device == "cpu")
    if device == "cpu" and quant is None:  # RMSNorm and SwiGLU in one native pass each (train/native.py)
        logger.debug("modules on native kernels: %d", fuse_native(model))
        if args.sft_type == "lora":  # and, where every part of a decoder layer does, the layer as one node
            logger.debug("decoder layers fused: %d", fuse_decoder_layers(model))
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def _with_lora(model: Any, args: SftArguments, spec: ModelSpec, checkpointing: bool, cpu_bf16: bool) -> Any:
    if checkpointing:
        model.enable_input_require_grads()
    model = apply_lora(model, args, spec.info.lora_target_modules if spec.info else None)
    if cpu_bf16:
        # bf16 activations go straight into the fp32 adapters under autocast, instead of peft casting them
        # to fp32 and autocast back to bf16 (two copies per adapter per pass: ~19% of a step on a CPU)
        for module in model.modules():
            if hasattr(module, "lora_A"):
                patches.patch_attribute("peft_input_cast_off", module, "cast_input_dtype_enabled", False)
    if not (args.deepspeed or args.fsdp):  # (sharded weights: peft's path)
        logger.debug("LoRA layers fused: %d", fuse_lora(model))
    return model


def placement(args: SftArguments, device: str, quantized: bool) -> dict[str, Any]:
    """Where the weights go: `device_map` (and `max_memory`) for `load_model`.

    One process that sees several GPUs spreads the layers over them (the spec's *_mp scripts). Under torchrun
    with more GPUs than processes on the node (and a multiple of them), each process gets its own group of GPUs
    (model parallel inside the group, DDP across groups): see `model_parallel_gpus`. Otherwise each process
    keeps its whole model on its own GPU."""
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
    if len(gpus) > 1 and (quantized or args.deepspeed or args.fsdp):
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


def attention_implementation(args: SftArguments, device: str) -> str | None:
    """--attn_impl; flash attention when asked (checked installed); on a CPU by default `martlet_varlen`, where
    each sample of a padding-free row attends on its own (train/varlen_attention.py)."""
    if args.use_flash_attn:
        check_flash_attn()
        return "flash_attention_2"
    if args.attn_impl is None and device == "cpu":
        return varlen_attention.register()
    return args.attn_impl

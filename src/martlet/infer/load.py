"""Build an engine from InferArguments: resolve the model, load tokenizer, template, weights, adapter."""

from __future__ import annotations

import logging
from typing import Optional

from martlet.args.infer import InferArguments
from martlet.infer.checkpoint import InferPlan, plan_inference
from martlet.infer.engine import TransformersEngine
from martlet.infer.protocol import Engine
from martlet.infer.vllm_engine import VllmEngine
from martlet.models.attention import check_flash_attn
from martlet.models.dtype import resolve_dtype
from martlet.models.loader import load_model, load_tokenizer, resolve_model
from martlet.models.quant import bnb_config
from martlet.templates import get_template
from martlet.train.packed import pack_for_inference
from martlet.tuners import Swift

logger = logging.getLogger("martlet")


def load_engine(args: InferArguments, plan: Optional[InferPlan] = None) -> Engine:
    """A TransformersEngine (or VllmEngine with --infer_backend vllm) for the plan of `args`.

    `args` is InferArguments or one of its subclasses (DeployArguments, AppUIArguments)."""
    import torch

    plan = plan or plan_inference(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    spec = resolve_model(plan.model_type, plan.model_id_or_path, check_model_is_latest=args.check_model_is_latest,
                         revision=args.model_revision, hub_token=args.hub_token)
    tokenizer = load_tokenizer(plan.tokenizer_dir or spec.model_dir, trust_remote_code=args.trust_remote_code)
    template = get_template(plan.template_type, tokenizer, plan.system, args.max_length, args.truncation_strategy,
                            fallback=spec.template_type)
    logger.info("model: %s (%s), adapter: %s, template: %s, dtype: %s", spec.model_type, spec.model_dir,
                plan.adapter_dir or "none", template.template_type, dtype)
    if args.infer_backend == "vllm":
        return VllmEngine(spec.model_dir, template, dtype=dtype, adapter_dir=plan.adapter_dir,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len)
    model = load_model(spec, dtype=dtype, device_map="auto" if device == "cuda" else None,
                       trust_remote_code=args.trust_remote_code, attn_impl=_attn(args),
                       quantization_config=_quantization(args, dtype))
    if plan.adapter_dir:
        model = Swift.from_pretrained(model, plan.adapter_dir, inference_mode=True)
    model.eval()
    if device == "cpu":  # the forward products on weights packed once for oneDNN (train/packed.py)
        logger.debug("linear layers packed for inference: %d", pack_for_inference(model))
    return TransformersEngine(model, template, max_batch_size=args.max_batch_size,
                              context_length=args.max_model_len)


def _attn(args: InferArguments) -> Optional[str]:
    if args.use_flash_attn:
        check_flash_attn()
        return "flash_attention_2"
    return args.attn_impl


def _quantization(args: InferArguments, dtype: str):
    if not args.quantization_bit:
        return None
    return bnb_config(args, dtype)

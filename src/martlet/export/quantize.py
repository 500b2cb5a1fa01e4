"""Quantized transformers models: bitsandbytes (no calibration), GPTQ and AWQ (calibrated, via GPTQModel).

Each writes a folder that `AutoModelForCausalLM.from_pretrained` loads (with the library installed): the
weights, the tokenizer with its chat template and the quantization settings in config.json.
bitsandbytes quantizes on the CPU too (its 0.50 release does); GPTQ and AWQ run the model layer by
layer on calibration text and need a CUDA GPU and the `gptqmodel` package (the maintained successor
of AutoGPTQ and AutoAWQ, which transformers itself uses to load both formats).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from martlet.args.export import ExportArguments
from martlet.data.preprocess import load_rows
from martlet.errors import MartletError
from martlet.models.dtype import resolve_dtype, torch_dtype
from martlet.models.loader import ModelSpec, load_model

logger = logging.getLogger("martlet")


def quantize_bnb(source_dir: str, out_dir: str, args: ExportArguments) -> None:
    """Load `source_dir` with bitsandbytes at --quant_bits and save the quantized weights to `out_dir`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MartletError("--quant_method bnb needs the bitsandbytes package.", field="quant_method",
                           hint="pip install 'martlet[bnb]' (recent releases quantize on a CPU too).")
    import torch
    from transformers import BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype, device)
    if args.quant_bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        compute = dtype if args.bnb_4bit_comp_dtype == "AUTO" else args.bnb_4bit_comp_dtype
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
                                    bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
                                    bnb_4bit_compute_dtype=torch_dtype(compute))
    try:
        model = load_model(ModelSpec("export", source_dir, None), dtype=dtype, quantization_config=config,
                           device_map="auto" if device == "cuda" else "cpu", trust_remote_code=args.trust_remote_code)
    except (RuntimeError, NotImplementedError, ImportError) as exc:
        raise MartletError(f"bitsandbytes could not quantize on this machine ({device}): {exc}",
                           field="quant_method",
                           hint="Install a release with CPU support (pip install -U bitsandbytes), run on a CUDA "
                                "GPU, or use --quant_method gguf.") from None
    model.save_pretrained(out_dir, max_shard_size=args.max_shard_size)


def check_calibrated(method: str) -> None:
    """MartletError unless GPTQ/AWQ can run here (a CUDA GPU and the gptqmodel package)."""
    import torch

    if not torch.cuda.is_available():
        raise MartletError(f"--quant_method {method} needs a CUDA GPU: it runs every layer on calibration text "
                           "and packs the weights with GPU kernels, and no GPU is visible here.",
                           field="quant_method",
                           hint="On a CPU use --quant_method gguf (q4_0, q8_0) or bnb; or run this command on a "
                                "machine with a GPU.")
    if importlib.util.find_spec("gptqmodel") is None:
        raise MartletError(f"--quant_method {method} needs the gptqmodel package.", field="quant_method",
                           hint="pip install gptqmodel (it matches your torch and CUDA versions).")


def calibration_rows(args: ExportArguments, source: Any, tokenizer: Any, template: Any) -> list[dict[str, Any]]:
    """Up to --quant_n_samples rows of --dataset (default: the training data), rendered and tokenized."""
    datasets = list(args.dataset) or list((source.checkpoint.sft_args.get("dataset") if source.checkpoint else None)
                                          or [])
    if not datasets:
        raise MartletError("GPTQ/AWQ need calibration text.", field="dataset",
                           hint="Pass --dataset NAME or FILE (rows like the ones the model will see).")
    rows = load_rows(datasets, seed=42)[: args.quant_n_samples]
    samples = []
    for row in rows:
        text = row.get("text") or template.render(template.with_system(row["messages"]))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.quant_seqlen]
        if ids:
            samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    if not samples:
        raise MartletError("no calibration rows.", field="dataset")
    logger.info("calibrating on %d rows (at most %d tokens each)", len(samples), args.quant_seqlen)
    return samples


def quantize_calibrated(method: str, source_dir: str, out_dir: str, args: ExportArguments, samples: list[dict[str, Any]]) -> None:
    """GPTQ or AWQ with GPTQModel: load, calibrate on `samples`, save to `out_dir`."""
    from gptqmodel import GPTQModel, QuantizeConfig

    kwargs: dict[str, Any] = {"bits": args.quant_bits, "group_size": args.quant_group_size}
    if method == "awq":
        from gptqmodel.quantization import METHOD

        kwargs["quant_method"] = METHOD.AWQ
    try:
        config = QuantizeConfig(**kwargs)
    except TypeError as exc:
        raise MartletError(f"this gptqmodel release does not take these settings: {exc}",
                           hint="pip install -U gptqmodel") from None
    model = GPTQModel.load(source_dir, config)
    model.quantize(samples, batch_size=args.quant_batch_size)
    model.save(out_dir)

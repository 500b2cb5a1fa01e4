"""bitsandbytes quantization for QLoRA (`--quantization_bit 4|8`)."""

from __future__ import annotations

import importlib.util

from martlet.args.model import ModelArguments
from martlet.errors import MartletError
from martlet.models.dtype import torch_dtype


def bnb_config(args: ModelArguments, dtype: str):
    """A transformers BitsAndBytesConfig from the arguments; a clear error when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MartletError("--quantization_bit needs the bitsandbytes package.", field="quantization_bit",
                           hint="pip install 'martlet[bnb]' (4-bit training needs a CUDA GPU for most releases).")
    from transformers import BitsAndBytesConfig

    compute = dtype if args.bnb_4bit_comp_dtype == "AUTO" else args.bnb_4bit_comp_dtype
    if args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(compute))

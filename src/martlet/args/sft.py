"""The arguments of `martlet sft` and `martlet pt`: the concerns above, side by side."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from martlet.args.base import check_ranges, option_names
from martlet.args.data import DataArguments, TemplateArguments
from martlet.args.lora import TunerArguments
from martlet.args.model import ModelArguments
from martlet.args.train import TrainArguments
from martlet.args.training_passthrough import check_training_args
from martlet.errors import MartletError, require_package
from martlet.train.deepspeed import resolve_deepspeed
from martlet.train.fsdp import resolve_fsdp


@dataclass
class SftArguments(ModelArguments, DataArguments, TemplateArguments, TunerArguments, TrainArguments):
    """Supervised fine-tuning (LoRA or full) of a causal language model on conversations."""

    def validate(self) -> "SftArguments":
        """Check the arguments together; raises MartletError naming the field. Changes nothing."""
        if not self.dataset:
            raise MartletError("no training data.", field="dataset",
                               hint="Pass --dataset NAME or FILE (`martlet list-datasets` lists built-in names).")
        check_ranges(self)
        checks = [
            ("num_train_epochs", self.num_train_epochs > 0 or self.max_steps > 0,
             "must be greater than 0 unless --max_steps is given"),
            ("quantization_bit", not (self.quantization_bit and self.sft_type == "full"),
             "quantized weights cannot be trained in full; use --sft_type lora (QLoRA)"),
            ("model_name", len(self.model_name) <= 2, "takes one name, or a Chinese and an English one"),
            ("model_author", len(self.model_author) <= 2, "takes one author, or a Chinese and an English one"),
        ]
        for field, ok, message in checks:
            if not ok:
                raise MartletError(f"{message} (got {getattr(self, field)!r}).", field=field)
        if self.use_liger_kernel:
            require_package("liger_kernel", "the Liger kernels are not installed.", field="use_liger_kernel",
                            hint="pip install liger-kernel (GPU with Triton), or drop --use_liger_kernel.")
        if self.quantization_bit:
            require_package("bitsandbytes", "--quantization_bit needs the bitsandbytes package.",
                            field="quantization_bit", hint="pip install 'martlet[bnb]' (4-bit training wants a GPU).")
        if self.fsdp:
            if self.deepspeed:
                raise MartletError("choose one of --deepspeed and --fsdp.", field="fsdp")
            resolve_fsdp(self.fsdp, self.fsdp_config)
        if self.deepspeed:
            resolve_deepspeed(self.deepspeed)
        resume = self.resume_from_checkpoint
        if resume and resume.lower() != "true" and not os.path.isdir(resume):
            raise MartletError("checkpoint folder not found.", file=self.resume_from_checkpoint,
                               field="resume_from_checkpoint")
        check_training_args(self.training_args, option_names(type(self)),
                            dict(learning_rate=self.effective_learning_rate(), weight_decay=self.weight_decay,
                                 max_grad_norm=self.max_grad_norm, lr_scheduler_type=self.lr_scheduler_type))
        return self

    # values derived from the arguments (never written back into them)
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.sft_type == "lora" else 1e-5

    def effective_save_steps(self) -> int:
        return self.save_steps or self.eval_steps

    def effective_padding_free(self) -> bool:
        if self.packing:
            return True  # packed rows carry their own position ids
        return self.padding_free if self.padding_free is not None else not self.trust_remote_code

    def effective_grad_accum(self, world_size: int = 1) -> int:
        if self.gradient_accumulation_steps is not None:
            return self.gradient_accumulation_steps
        return max(1, math.ceil(16 / self.batch_size / world_size))


@dataclass
class PtArguments(SftArguments):
    """Continued pre-training on plain text: every token carries loss."""

"""`martlet sft` / `sft_main` and `martlet pt` / `pt_main`: the training pipeline (train/pipeline.py) with SFT's
examples and trainer.

parse -> validate -> model files -> tokenizer and template -> data -> model (+LoRA) -> run folder ->
Trainer -> train -> curves -> result.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from transformers import DataCollatorForSeq2Seq, TrainingArguments

from martlet.args import PtArguments, SftArguments, parse_cli
from martlet.data.preprocess import encode_rows, train_val_rows
from martlet.models.dtype import torch_dtype
from martlet.train import batching
from martlet.train.batching import PaddingFreeCollator, pack_dataset
from martlet.train.kernels import shape_multiple
from martlet.train.loss import lean_loss_supported, unwrap_causal_lm
from martlet.train.pipeline import EncodedData, Reference, RunSetup, TrainingRun, encode_split, run_training
from martlet.train.trainer import MartletTrainer
from martlet.train.varlen_attention import reads_shared_prefixes
from martlet.utils import setup_logging

logger = logging.getLogger("martlet")


def sft_main(args: SftArguments | Sequence[str] | None = None, *, mode: str = "sft") -> dict[str, Any]:
    """Fine-tune and return {best_model_checkpoint, last_model_checkpoint, log_history, ...}."""
    setup_logging()
    if not isinstance(args, SftArguments):
        args = parse_cli(PtArguments if mode == "pt" else SftArguments, args)
    args.validate()
    return run_training(args, SftMethod(mode))


def pt_main(args: PtArguments | Sequence[str] | None = None) -> dict[str, Any]:
    """Continued pre-training: loss on every token of plain text (or of whole rendered conversations)."""
    return sft_main(args, mode="pt")


class SftMethod:
    """SFT's part of the pipeline (`mode` "sft" or "pt"): rows rendered by the template, labels on the
    assistant's tokens (pt: on every token); transformers' Trainer with Martlet's collators and loss."""

    cut_in_template = True

    def __init__(self, mode: str):
        self.mode = mode

    def command(self, args: SftArguments) -> str:
        return self.mode

    def encode(self, setup: RunSetup) -> EncodedData:
        args = setup.args
        train_rows, val_rows = train_val_rows(args)
        return encode_split(encode_rows, train_rows, val_rows, setup.template, mode=self.mode,
                            num_proc=args.preprocess_num_proc, cache=args.load_from_cache_file)

    def reference(self, setup: RunSetup) -> Reference:
        return Reference()  # SFT compares with no reference model

    def build_trainer(self, run: TrainingRun, model: Any, reference: Reference, data: EncodedData) -> MartletTrainer:
        return build_sft_trainer(run, model, data)


def build_sft_trainer(run: TrainingRun, model: Any, data: EncodedData) -> MartletTrainer:
    """Martlet's Trainer on the encoded rows: packed or padding-free as asked, with the run's files in every
    checkpoint."""
    args, has_eval = run.args, data.val is not None
    kwargs = run.training_kwargs(model, has_eval)
    kwargs.update(prediction_loss_only=True, torch_compile=args.torch_compile, use_liger_kernel=args.use_liger_kernel)
    if args.group_by_length and not args.packing:
        kwargs["train_sampling_strategy"] = "group_by_length"
    training_args = TrainingArguments(**kwargs)
    if args.effective_padding_free():  # bf16 on a CPU: rows in steps of 64 tokens, unless packed (PaddingFreeCollator)
        share = batching.SHARE_PREFIXES and reads_shared_prefixes(unwrap_causal_lm(model).config, args.max_length)
        collator = PaddingFreeCollator(shape_multiple(run.device, torch_dtype(run.dtype)),
                                       run.tokenizer.pad_token_id or 0, share_prefixes=share)
    else:
        collator = DataCollatorForSeq2Seq(run.tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    train_set = data.train
    if args.packing:
        before = len(train_set)
        train_set = pack_dataset(train_set, args.max_length, seed=args.seed)
        logger.info("packing: %d samples -> %d rows of up to %d tokens (%.1f%% full)", before, len(train_set),
                    args.max_length, 100 * sum(train_set["length"]) / max(1, len(train_set) * args.max_length))
    train_set = train_set.remove_columns(["length"])  # (length grouping measures input_ids itself)
    val_set = data.val.remove_columns(["length"]) if has_eval else None
    return MartletTrainer(model=model, args=training_args, train_dataset=train_set,
                          eval_dataset=val_set, data_collator=collator, processing_class=run.tokenizer,
                          callbacks=run.callbacks(has_eval), run_files=run.run_files,
                          lean_loss=args.lean_loss and not args.use_liger_kernel and lean_loss_supported(model))


def main(argv: Sequence[str] | None = None) -> int:
    return 130 if sft_main(argv)["interrupted"] else 0


def pt_cli(argv: Sequence[str] | None = None) -> int:
    return 130 if pt_main(argv)["interrupted"] else 0

"""`martlet rlhf --rlhf_type rm`: a reward model (the base with a one-output score head) trained with trl's
RewardTrainer on the pairs DPO reads (data/preference.py), LoRA (the score head trained in full, peft's
modules_to_save) or full; and `RewardModel(path).score(conversations)`, which GRPO's --reward_model uses too.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import torch
import trl
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

from martlet.args.rlhf import RLHFArguments
from martlet.data.preference import encode_preference_rows, preference_train_val_rows
from martlet.launch import main_process_first
from martlet.models.dtype import torch_dtype
from martlet.models.loader import ModelSpec, load_tokenizer
from martlet.models.quant import bnb_config
from martlet.train.lora_setup import count_parameters, lora_targets
from martlet.train.pipeline import EncodedData, Reference, RunSetup, TrainingRun
from martlet.train.trainer import AtomicCheckpointMixin
from martlet.utils import libraries_quietly

logger = logging.getLogger("martlet")


def load_reward_model_for_training(args: RLHFArguments, spec: ModelSpec, dtype: str, device: str) -> Any:
    """The base model with a one-output score head (`num_labels=1`), LoRA-wrapped (score head trained in full)
    or whole."""
    set_seed(args.seed)  # the score head and LoRA start from random weights
    quant = bnb_config(args, dtype) if args.quantization_bit else None
    load_dtype = dtype if device == "cuda" else "fp32"  # (a CPU trains fp32 master weights under autocast)
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.model_dir, num_labels=1, dtype=torch_dtype(load_dtype), trust_remote_code=args.trust_remote_code,
        quantization_config=quant)
    model.config.pad_token_id = load_tokenizer(spec.model_dir).pad_token_id
    model.config.use_cache = False
    if args.sft_type == "lora":
        targets = lora_targets(args.lora_target_modules, spec.info.lora_target_modules if spec.info else None)
        config = LoraConfig(task_type="SEQ_CLS", r=args.lora_rank, lora_alpha=args.lora_alpha,
                            lora_dropout=args.lora_dropout, target_modules=targets,
                            modules_to_save=["score", *(args.lora_modules_to_save or [])])
        with libraries_quietly():
            model = get_peft_model(model, config)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


class RewardTrainer(AtomicCheckpointMixin, trl.RewardTrainer):
    """trl's RewardTrainer with whole checkpoints; rows come tokenized (chosen_ids, rejected_ids)."""


class RewardModelMethod:
    """The reward model's part of the pipeline: pairs as whole token sequences, a score-head model, trl's trainer."""

    cut_in_template = False

    def command(self, args: RLHFArguments) -> str:
        return "rm"

    def load_model(self, args: RLHFArguments, spec: ModelSpec, dtype: str, device: str) -> Any:
        return load_reward_model_for_training(args, spec, dtype, device)

    def encode(self, setup: RunSetup) -> EncodedData:
        args = setup.args
        train_rows, val_rows = preference_train_val_rows(args)
        encode = dict(max_length=args.max_length, truncation_strategy=args.truncation_strategy,
                      cache=args.load_from_cache_file)
        with main_process_first():
            train, train_stats = encode_preference_rows(train_rows, setup.template, **encode)
            val, val_stats = (encode_preference_rows(val_rows, setup.template, what="val", **encode) if val_rows
                              else (None, None))
        return EncodedData(_whole_sequences(train), _whole_sequences(val) if val is not None else None,
                           {"train": train_stats, "val": val_stats})

    def reference(self, setup: RunSetup) -> Reference:
        return Reference(None, "none (reward model)")

    def build_trainer(self, run: TrainingRun, model: Any, reference: Reference, data: EncodedData) -> RewardTrainer:
        has_eval = data.val is not None
        config = trl.RewardConfig(**run.training_kwargs(model, has_eval), max_length=None)
        return RewardTrainer(model=model, args=config, train_dataset=data.train, eval_dataset=data.val,
                             processing_class=run.tokenizer, callbacks=run.callbacks(has_eval),
                             run_files=run.run_files)


def _whole_sequences(dataset: Any) -> Any:
    """Martlet's encoded pairs (prompt_ids, chosen_ids, rejected_ids: replies alone) as trl's tokenized reward rows
    (chosen_ids, rejected_ids: prompt and reply)."""
    def join(row: dict[str, Any]) -> dict[str, Any]:
        return {"chosen_ids": row["prompt_ids"] + row["chosen_ids"],
                "rejected_ids": row["prompt_ids"] + row["rejected_ids"]}

    keep = {"chosen_ids", "rejected_ids"}
    return dataset.map(join, remove_columns=[c for c in dataset.column_names if c not in keep])


class RewardModel:
    """A reward model trained by `martlet rlhf --rlhf_type rm` (a checkpoint folder, LoRA or full):
    `RewardModel(path).score([[{role, content}, ...], ...]) -> [float, ...]`, one score per conversation."""

    def __init__(self, path: str, dtype: str = "fp32"):
        adapter = os.path.join(path, "adapter_config.json")
        if os.path.isfile(adapter):
            with open(adapter, encoding="utf-8") as fh:
                base = json.load(fh)["base_model_name_or_path"]
            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch_dtype(dtype))
            with libraries_quietly():
                model = PeftModel.from_pretrained(model, path).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype(dtype))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.eval().requires_grad_(False)
        self.model.config._name_or_path = path  # trl names the reward after it

    def model_and_tokenizer(self) -> tuple[Any, Any]:
        return self.model, self.tokenizer

    def score(self, conversations: Sequence[Sequence[dict[str, str]]], batch_size: int = 8) -> list[float]:
        texts = [self.tokenizer.apply_chat_template(list(c), tokenize=False) for c in conversations]
        scores: list[float] = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False)
            with torch.no_grad():
                scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores

"""Datasets, the template that renders them, and how long a sample may be."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from martlet.args.base import arg


@dataclass
class DataArguments:
    dataset: List[str] = arg([], "Dataset names (`martlet list-datasets`), hub ids or files (.jsonl, .json, .csv). "
                                 "`name#N` samples N rows.", aliases=("datasets",))
    val_dataset: List[str] = arg([], "Validation datasets (same forms). When given, nothing is split off "
                                     "--dataset.")
    dataset_test_ratio: float = arg(0.01, "Share of --dataset held out for validation (by --dataset_seed).",
                                    aliases=("split_dataset_ratio",), bounds="[0, 1)")
    dataset_seed: int = arg(42, "Seed of the validation split and of `name#N` sampling.",
                            bounds="[0, 4294967295]")
    train_dataset_sample: int = arg(-1, "Keep at most this many training rows (-1: all).", bounds="[1, inf)",
                                    unset=(-1,))
    val_dataset_sample: Optional[int] = arg(None, "Keep at most this many validation rows (0: no validation).",
                                            bounds="[0, inf)")
    preprocess_num_proc: Optional[int] = arg(None, "Processes for tokenization. Default: one per 10,000 rows, up to "
                                                   "the CPU count (small sets are quicker in one).",
                                             aliases=("num_proc", "dataset_num_proc"), bounds="[1, inf)")
    load_from_cache_file: bool = arg(True, "Reuse rows tokenized by an earlier run on the same data and template "
                                           "(kept in Martlet's cache, ~/.cache/martlet/tokenized).")
    model_name: List[str] = arg([], "The model's name in self-cognition data: one name, or a Chinese and an "
                                    "English name.")
    model_author: List[str] = arg([], "The model's author in self-cognition data: one, or Chinese and English.")
    custom_dataset_info: Optional[str] = arg(None, "A JSON file registering more datasets by name.")
    custom_register_path: List[str] = arg([], "Python files run before the command that register datasets, models or "
                                              "templates (martlet.llm.register_dataset / register_model / "
                                              "register_template).")


@dataclass
class TemplateArguments:
    template_type: str = arg("AUTO", "Chat template. AUTO: the tokenizer's own, else the model type's. "
                                     "`martlet list-templates` lists the named ones.", aliases=("template",))
    system: Optional[str] = arg(None, "System prompt; replaces the template's default.")
    max_length: int = arg(2048, "Longest sample in tokens; see --truncation_strategy for longer ones.",
                          bounds="[1, inf)")
    truncation_strategy: str = arg("delete", "What to do with longer samples: delete them, or truncation_left "
                                             "(drop the oldest tokens).", choices=("delete", "truncation_left"))

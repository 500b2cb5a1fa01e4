"""What is trained: LoRA adapters or all weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from martlet.args.base import arg


@dataclass
class TunerArguments:
    sft_type: str = arg("lora", "lora (adapters on a frozen model) or full (all weights).",
                        aliases=("train_type",), choices=("lora", "full"))
    lora_target_modules: List[str] = arg(["DEFAULT"], "Where LoRA goes: DEFAULT (the model type's usual "
                                                      "attention projections), ALL (every linear layer) or "
                                                      "module names.", aliases=("target_modules",),
                                         spellings={"all-linear": "ALL"})
    lora_rank: int = arg(8, "LoRA rank r.", aliases=("lora_r",), bounds="[1, inf)")
    lora_alpha: int = arg(32, "LoRA scaling alpha (the update is scaled by alpha / rank).",
                          bounds="(0, inf)")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA input.", aliases=("lora_dropout_p",),
                              bounds="[0, 1)")
    lora_modules_to_save: List[str] = arg([], "Extra modules trained in full and saved with the adapter.",
                                          aliases=("modules_to_save",))
    use_rslora: bool = arg(False, "Rank-stabilized LoRA scaling.")
    use_dora: bool = arg(False, "Weight-decomposed LoRA (DoRA).")

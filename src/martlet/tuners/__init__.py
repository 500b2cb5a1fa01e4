"""`from martlet.tuners import Swift`: the spec's adapter API, with peft doing the work.

`Swift.from_pretrained(model, ckpt_dir, inference_mode=True)` puts the LoRA adapter saved in a
checkpoint of `martlet sft` on a loaded base model (a `peft.PeftModel`). This is the user's side of adapters:
loading and merging trained ones. Setting up new adapters for training is `martlet.train.lora_setup`.
"""

from __future__ import annotations

import os
from typing import Any

from martlet.errors import MartletError
from martlet.utils import libraries_quietly


class Swift:
    @staticmethod
    def from_pretrained(model: Any, model_id: str, adapter_name: str = "default", inference_mode: bool = True,
                        revision: str | None = None, **kwargs: Any):
        """`model` with the adapter of `model_id` (a checkpoint folder or a hub id); frozen when inference_mode."""
        from peft import PeftModel

        folder = os.path.expanduser(model_id)
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise MartletError("this folder holds no LoRA adapter (adapter_config.json).", file=folder,
                               hint="A full or -merged checkpoint is a whole model: load it with "
                                    "get_model_tokenizer(model_type, model_id_or_path=folder) instead.")
        with libraries_quietly():
            model = PeftModel.from_pretrained(model, folder if os.path.isdir(folder) else model_id,
                                              adapter_name=adapter_name, is_trainable=not inference_mode,
                                              revision=revision, **kwargs)
        if inference_mode:
            model.eval()
        return model

    @staticmethod
    def merge_and_unload(model: Any):
        """The base model with the adapter's weights added in (no peft wrapper left)."""
        return model.merge_and_unload()


__all__ = ["Swift"]

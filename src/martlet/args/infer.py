"""The arguments of `martlet infer` (and `martlet merge-lora`): the model and template concerns of
training, the data ones for evaluation, generation settings and where results go."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

from martlet.args.base import Route, arg, check_ranges
from martlet.args.data import DataArguments, TemplateArguments
from martlet.args.model import ModelArguments
from martlet.errors import MartletError


def one_adapter(raw: Any) -> dict[str, Any]:
    """ms-swift 3's `--adapters` (a list) where Martlet loads one adapter: its one folder is --ckpt_dir."""
    items = raw if isinstance(raw, list) else [raw]
    if len(items) != 1:
        raise MartletError(f"--adapters takes one checkpoint folder here (it is --ckpt_dir), got {len(items)}: "
                           f"{' '.join(map(str, items))}.", field="ckpt_dir",
                           hint="Merge them into one, or serve several with `martlet deploy --adapters "
                                "name=path ...`.")
    return {"ckpt_dir": items}


@dataclass
class GenerationArguments:
    """Sampling settings; a value left out comes from the model's generation_config.json."""

    max_new_tokens: Optional[int] = arg(None, "Longest reply in tokens. Default: the model's generation config, "
                                              "else 2048.", bounds="[1, inf)")
    do_sample: Optional[bool] = arg(None, "Sample (true) or decode greedily (false). Default: the model's "
                                          "generation config (greedy when it says nothing).")
    temperature: Optional[float] = arg(None, "Sampling temperature; 0 means greedy.", bounds="[0, inf)")
    top_k: Optional[int] = arg(None, "Sample among the k most likely tokens (0: all).", bounds="[0, inf)")
    top_p: Optional[float] = arg(None, "Sample among the most likely tokens whose probabilities add up to p.",
                                   bounds="(0, 1]")
    repetition_penalty: Optional[float] = arg(None, "Penalty above 1 discourages repeating tokens.",
                                                bounds="(0, inf)")
    num_beams: Optional[int] = arg(None, "Beam search width (1: no beam search; streaming shows a beam search "
                                         "reply at once).", bounds="[1, inf)")
    stop_words: List[str] = arg([], "Extra strings that end a reply (the template's end-of-turn always does).")


@dataclass
class InferArguments(ModelArguments, DataArguments, TemplateArguments, GenerationArguments):
    """Chat with a model or a fine-tuned checkpoint, or evaluate it on a dataset."""

    ROUTES: ClassVar[dict[str, Route]] = {"adapters": one_adapter}

    ckpt_dir: Optional[str] = arg(None, "A checkpoint from `martlet sft` (LoRA, full or `-merged`). Its saved "
                                        "arguments supply the base model, template and system prompt; values given "
                                        "here win.", aliases=("adapters",))
    load_dataset_config: bool = arg(False, "Evaluate on exactly the validation rows the training run of --ckpt_dir "
                                           "held out (its datasets, seed and ratio).")
    merge_lora: bool = arg(False, "Merge the LoRA checkpoint into its base model first (written to "
                                  "<ckpt_dir>-merged) and infer with the merged weights.",
                           aliases=("merge_lora_and_save",))
    merge_device_map: str = arg("cpu", "Where the merge runs: cpu, or auto to use the GPU.")
    replace_if_exists: bool = arg(False, "Merge again even when <ckpt_dir>-merged exists.")
    val_dataset_sample: Optional[int] = arg(None, "Evaluate at most this many rows (default: all the validation "
                                                  "rows).", aliases=("show_dataset_sample",), bounds="[1, inf)")
    dataset_test_ratio: float = arg(0.01, "Share of --dataset held out and evaluated, as training splits it (by "
                                          "--dataset_seed); 0 evaluates every row.",
                                    aliases=("split_dataset_ratio",), bounds="[0, 1)")
    max_batch_size: int = arg(16, "Rows generated together (dataset evaluation; deploy's dynamic batches).",
                              aliases=("batch_size",), bounds="[1, inf)")
    infer_backend: str = arg("AUTO", "Inference engine: pt (transformers), vllm (GPU, needs the vllm package) or "
                                     "AUTO (pt).", choices=("AUTO", "pt", "vllm"))
    gpu_memory_utilization: float = arg(0.9, "vllm: share of GPU memory it may take.", bounds="(0, 1]")
    tensor_parallel_size: int = arg(1, "vllm: GPUs one model is split across.", bounds="[1, inf)")
    max_model_len: Optional[int] = arg(None, "vllm: longest prompt + reply in tokens (default: the model's).",
                                         bounds="[1, inf)")
    stream: bool = arg(True, "Chat: print the reply token by token as it is generated.")
    result_dir: Optional[str] = arg(None, "Where evaluation results go. Default: <ckpt_dir>/infer_result, or "
                                          "output/infer_result for a base model.")
    save_result: bool = arg(True, "Write the evaluation results (JSONL) and metrics.")
    verbose: bool = arg(True, "Evaluation: print every query, reply and label (false: a progress bar).")
    seed: int = arg(42, "Random seed for sampling.", bounds="[0, 4294967295]")

    def validate(self) -> "InferArguments":
        """Check the arguments together; raises MartletError naming the field. Changes nothing."""
        check_ranges(self)
        for field in ("load_dataset_config", "merge_lora"):
            if getattr(self, field) and not self.ckpt_dir:
                raise MartletError("needs --ckpt_dir (a checkpoint of `martlet sft`).", field=field)
        if self.ckpt_dir and not os.path.isdir(self.ckpt_dir):
            raise MartletError("checkpoint folder not found.", file=self.ckpt_dir, field="ckpt_dir")
        if self.result_dir and os.path.isfile(self.result_dir):
            raise MartletError("is a file; it must be a folder.", file=self.result_dir, field="result_dir")
        return self

    def wants_dataset(self) -> bool:
        """True when rows are evaluated; else the command is an interactive chat."""
        return bool(self.load_dataset_config or self.dataset or self.val_dataset)

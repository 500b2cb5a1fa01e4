"""The arguments of `martlet eval`: the model (or checkpoint) to evaluate, the suites, and where results go."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from martlet.args.base import arg, check_ranges
from martlet.args.data import TemplateArguments
from martlet.args.model import ModelArguments
from martlet.errors import MartletError

# built into Martlet, offline: held-out generated math problems and self-cognition questions
BUILTIN_SUITES = ("math-easy-en", "math-easy-zh", "math-small-en", "math-small-zh", "math-en", "math-zh",
                  "self-cognition")
# run by lm-evaluation-harness (the eval-harness extra); their data is downloaded from the hub
HARNESS_SUITES = ("gsm8k", "mmlu", "ceval", "cmmlu")


@dataclass
class EvalArguments(ModelArguments, TemplateArguments):
    """Evaluate a model or checkpoint on built-in or standard suites, the base model beside it if asked."""

    ckpt_dir: Optional[str] = arg(None, "A checkpoint from `martlet sft` or `martlet rlhf` (LoRA, full or -merged). "
                                        "Its saved arguments supply the base model, template, system prompt and "
                                        "the self-cognition names; values given here win.")
    eval_dataset: List[str] = arg(["math-easy-en", "math-en", "math-zh"],
                                  "Suites to run: built-in (offline) math-easy-en, math-easy-zh (two-number "
                                  "arithmetic), math-small-en, math-small-zh (the same with one-digit "
                                  "numbers), math-en, math-zh (every kind of generated problem), "
                                  "self-cognition; or through lm-evaluation-harness (needs a network and "
                                  "martlet[eval-harness]) gsm8k, mmlu, ceval, cmmlu.",
                                  aliases=("eval_datasets",), choices=BUILTIN_SUITES + HARNESS_SUITES)
    eval_base: bool = arg(False, "Also evaluate the base model of --ckpt_dir, side by side with the checkpoint.")
    eval_limit: Optional[int] = arg(None, "Questions per suite (default: 100 for a built-in suite, all of a "
                                          "standard one).", bounds="[1, inf)")
    answer_instruction: bool = arg(False, "Math suites: end each question with the answer-line instruction that "
                                          "`martlet grpo` adds to its prompts (\"... write the final line as "
                                          "'Answer: <number>'\"), to evaluate a GRPO-tuned model on the prompt it "
                                          "trained with.")
    max_new_tokens: int = arg(256, "Longest reply in tokens; decoding is greedy.", bounds="[1, inf)")
    max_batch_size: int = arg(16, "Questions generated together in one batch.", aliases=("batch_size",),
                              bounds="[1, inf)")
    infer_backend: str = arg("AUTO", "Inference engine: pt (transformers), vllm (GPU, needs the vllm package) or "
                                     "AUTO (pt).", choices=("AUTO", "pt", "vllm"))
    model_name: List[str] = arg([], "self-cognition: the name the model should give (one, or a Chinese and an "
                                    "English one). Default: the checkpoint's --model_name.")
    model_author: List[str] = arg([], "self-cognition: the author the model should give (one, or Chinese and "
                                      "English). Default: the checkpoint's --model_author.")
    output_dir: Optional[str] = arg(None, "Where the JSON results and the PNG chart go. Default: "
                                          "<ckpt_dir>/eval_result, or output/eval_result for a model.")

    def validate(self) -> "EvalArguments":
        """Check the arguments together; raises MartletError naming the field. Changes nothing."""
        check_ranges(self)
        if not self.eval_dataset:
            raise MartletError("needs at least one suite.", field="eval_dataset",
                               hint=f"Choose among: {', '.join(BUILTIN_SUITES + HARNESS_SUITES)}.")
        if self.eval_base and not self.ckpt_dir:
            raise MartletError("needs --ckpt_dir: the base model is the one the checkpoint was trained from.",
                               field="eval_base")
        if self.ckpt_dir and not os.path.isdir(self.ckpt_dir):
            raise MartletError("checkpoint folder not found.", file=self.ckpt_dir, field="ckpt_dir")
        if self.output_dir and os.path.isfile(self.output_dir):
            raise MartletError("is a file; it must be a folder.", file=self.output_dir, field="output_dir")
        return self

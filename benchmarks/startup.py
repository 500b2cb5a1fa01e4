"""Startup: seconds from launching a training command to its first training step, warm cache, side by side in
one invocation.

    HF_HUB_OFFLINE=1 python benchmarks/startup.py [--rounds 3]

- martlet: `martlet sft` (the CLI's own entry point, in a fresh Python process) on the embedded SmolLM2 with LoRA
  and the built-in self-cognition set (100 rows), `--max_steps 1`.
- baseline: a plain script doing the same with transformers + peft: tokenizer and model from the same folder,
  the same 100 rows through the chat template, a `Trainer` with LoRA on all linear layers, one step.

Both are timed by the same hook: the wall-clock time at which `Trainer.training_step` is first entered, minus the
time just before the process was launched. The hook goes in as transformers' trainer module is imported, so it
imports nothing itself and each side pays for its own imports. Each side runs once untimed first (warm page cache,
Martlet's tokenized-data cache and native kernels), then `--rounds` times in turn; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HOOK = """
import importlib.abc, importlib.machinery, json, os, sys, time
def _timed(trainer):
    original = trainer.training_step
    def _first(self, *args, **kwargs):
        if not os.environ.get("_STARTUP_SEEN"):
            os.environ["_STARTUP_SEEN"] = "1"
            with open(os.environ["STARTUP_RESULT"], "w") as fh:
                json.dump({"first_step_at": time.time()}, fh)
        return original(self, *args, **kwargs)
    trainer.training_step = _first
class _AfterTrainer(importlib.abc.MetaPathFinder):  # the hook goes in when transformers' Trainer is imported, by
    def find_spec(self, name, path, target=None):   # whichever side, so that the hook itself imports nothing early
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            _timed(module.Trainer)
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _AfterTrainer())
"""

MARTLET = HOOK + """
import sys
from martlet import cli
sys.exit(cli.main(["sft", "--dataset", "self-cognition#100", "--model_name", "Martlet", "--model_author",
                   "Birdhouse", "--max_steps", "1", "--gradient_accumulation_steps", "1", "--report_to", "none",
                   "--disable_tqdm", "true", "--output_dir", os.environ["STARTUP_OUT"]]))
"""

BASELINE = HOOK + """
import json, os
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from martlet.models.embedded import embedded_model_dir
from martlet.data.builtin import __file__ as builtin_init

folder = embedded_model_dir()
tokenizer = AutoTokenizer.from_pretrained(folder)
rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(builtin_init), "self_cognition.jsonl"))][:100]
def encode(row):
    reply = row["response"].replace("{{NAME}}", "Martlet").replace("{{AUTHOR}}", "Birdhouse")
    messages = [{"role": "user", "content": row["query"]}, {"role": "assistant", "content": reply}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return {"input_ids": ids, "labels": ids}
data = Dataset.from_list([encode(r) for r in rows])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=os.environ["STARTUP_OUT"], per_device_train_batch_size=1, max_steps=1,
                         report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)).train()
"""

SIDES = {"baseline": BASELINE, "martlet": MARTLET}


def run(side: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        env = {**os.environ, "STARTUP_RESULT": result, "STARTUP_OUT": os.path.join(tmp, "out")}
        start = time.time()
        subprocess.run([sys.executable, "-c", SIDES[side]], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        with open(result, encoding="utf-8") as fh:
            return json.load(fh)["first_step_at"] - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for side in SIDES:  # warm-up, untimed
        run(side)
    times = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            times[side].append(run(side))
    base, ours = statistics.median(times["baseline"]), statistics.median(times["martlet"])
    print(f"seconds to the first training step (median of {args.rounds}, warm cache)")
    print(f"baseline (transformers + peft script): {base:.2f}  rounds: {', '.join(f'{t:.2f}' for t in times['baseline'])}")
    print(f"martlet sft:                           {ours:.2f}  rounds: {', '.join(f'{t:.2f}' for t in times['martlet'])}")
    print(f"ratio: {ours / base:.2f}x")


if __name__ == "__main__":
    main()

"""GRPO throughput and memory: plain trl GRPOTrainer + peft against Martlet's `martlet grpo`, side by side in one
invocation, on the embedded SmolLM2 and the same easy math prompts.

    HF_HUB_OFFLINE=1 python benchmarks/grpo_throughput.py [--steps 6] [--rounds 1] [--beta 0.04] [--json out.json]

Settings shared by both sides: LoRA r8 / alpha 32 / dropout 0 on all linear layers; 16 two-number arithmetic
prompts (the easy rows `martlet eval` draws, at the training seed) with Martlet's answer instruction; rewards
`format` + `accuracy` (the same Python functions); 8 completions a step (2 prompts x --num_generations 4, no
gradient accumulation), max completion length 32, temperature 1, beta 0 (no reference model; --beta 0.04, the
default of ms-swift and Martlet, adds the KL term: both sides then score the completions under the reference, trl's
copy of the initial adapter, each step), learning rate 1e-4 constant, seed 42.
Baseline: `trl.GRPOTrainer` with its defaults on a CPU (fp32, padded scoring, gradient checkpointing on), nothing
else. Martlet: `rlhf_main --rlhf_type grpo` with its defaults (dtype AUTO: bf16 weights and autocast on a CPU with
bf16, padding-free scoring, fused CPU kernels).

Each side runs in its own process (peak RSS is per process). Both are timed by the same hooks on trl's class:
`training_step` (a whole step: generation, rewards, scoring, backward) and `_generate_single_turn` (generation
alone; tokens = completion tokens generated, which differ between the sides since sampling differs). The first
--warmup steps are not timed. It prints one table with the ratios (martlet / baseline), and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS, GENERATIONS, BATCH, COMPLETION, LR, SEED = 16, 4, 8, 32, 1e-4, 42
BETA = [0.0]  # set from --beta in each process


def prompt_rows() -> list[dict]:
    """The 16 easy math rows both sides train on: {query, solution}."""
    from martlet.data.builtin import math_gen
    from martlet.evaluation.suites import TRAIN_SEED

    rows = math_gen.generate(PROMPTS, seed=TRAIN_SEED, lang="en", level="easy")
    return [{"query": r["query"], "solution": r["answer"]} for r in rows]


# --------------------------------------------------------------------------------------------------------
# the instrument: identical for both sides (Martlet's trainer subclasses trl's and calls these through super())
def instrument(record: dict) -> None:
    """Wrap trl.GRPOTrainer.training_step and _generate_single_turn to time them and count generated tokens."""
    import trl

    step, generate = trl.GRPOTrainer.training_step, trl.GRPOTrainer._generate_single_turn

    def timed_step(self, *args, **kwargs):
        start = time.perf_counter()
        loss = step(self, *args, **kwargs)
        record["steps"].append(time.perf_counter() - start)
        return loss

    def timed_generate(self, *args, **kwargs):
        start = time.perf_counter()
        out = generate(self, *args, **kwargs)
        completion_ids = out[0]
        tokens = sum(len(ids) for ids in completion_ids)
        record["generations"].append({"seconds": time.perf_counter() - start, "tokens": tokens})
        return out

    trl.GRPOTrainer.training_step, trl.GRPOTrainer._generate_single_turn = timed_step, timed_generate


def summary(record: dict, log_history: list[dict], warmup: int) -> dict:
    steps, gens = record["steps"][warmup:], record["generations"][warmup:]
    gen_seconds = sum(g["seconds"] for g in gens)
    rewards = [h["reward"] for h in log_history if "reward" in h]
    return {"steps": len(record["steps"]), "s_per_step": sum(steps) / max(1, len(steps)),
            "gen_s_per_step": gen_seconds / max(1, len(gens)),
            "gen_tokens_per_s": sum(g["tokens"] for g in gens) / max(gen_seconds, 1e-9),
            "gen_tokens_per_step": sum(g["tokens"] for g in gens) / max(1, len(gens)),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "mean_reward": sum(rewards) / max(1, len(rewards))}


# --------------------------------------------------------------------------------------------------------
# the sides (each runs in a child process)
def baseline(steps: int, out_dir: str, warmup: int) -> dict:
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from martlet.models.embedded import embedded_model_dir
    from martlet.train import rewards

    rows = [{"prompt": [{"role": "user", "content": rewards.with_answer_instruction(r["query"])}],
             "solution": r["solution"]} for r in prompt_rows()]
    folder = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    record = {"steps": [], "generations": []}
    instrument(record)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = trl.GRPOConfig(output_dir=out_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                            num_generations=GENERATIONS, max_completion_length=COMPLETION, temperature=1.0,
                            beta=BETA[0],
                            max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", logging_steps=1,
                            save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=SEED, data_seed=SEED,
                            disable_tqdm=True)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[rewards.format, rewards.accuracy], args=config,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
    trainer.train()
    return summary(record, trainer.state.log_history, warmup)


def martlet(steps: int, out_dir: str, warmup: int) -> dict:
    from martlet.train.rlhf import rlhf_main

    data = os.path.join(out_dir, "prompts.jsonl")
    os.makedirs(out_dir, exist_ok=True)
    with open(data, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"messages": [{"role": "user", "content": row["query"]}],
                                  "solution": row["solution"]}) + "\n" for row in prompt_rows())
    record = {"steps": [], "generations": []}
    instrument(record)
    extra = os.environ.get("MARTLET_BENCH_ARGS", "").split()  # ablations, e.g. "--padding_free false"
    result = rlhf_main(["--rlhf_type", "grpo", "--dataset", data, "--reward_funcs", "format", "accuracy",
                        "--num_generations", str(GENERATIONS), "--max_completion_length", str(COMPLETION),
                        "--temperature", "1.0", "--beta", str(BETA[0]), "--batch_size", str(BATCH),
                        "--gradient_accumulation_steps", "1", "--max_steps", str(steps), "--learning_rate", str(LR),
                        "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--lora_rank", "8",
                        "--lora_alpha", "32", "--lora_dropout", "0", "--lora_target_modules", "ALL",
                        "--dataset_test_ratio", "0", "--logging_steps", "1", "--seed", str(SEED),
                        "--report_to", "none", "--disable_tqdm", "true", "--output_dir", out_dir,
                        "--save_steps", str(10 * steps), "--save_only_model", "true", *extra])
    return summary(record, result["log_history"], warmup)


SIDES = {"baseline": baseline, "martlet": martlet}


# --------------------------------------------------------------------------------------------------------
def run_side(side: str, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(steps), "--warmup", str(warmup),
               "--beta", str(BETA[0]), "--result", result_file, "--out", os.path.join(tmp, "out")]
        print(f"running {side} ...", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None,
                       stderr=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None)
        with open(result_file, encoding="utf-8") as fh:
            return {**json.load(fh), "process_s": time.perf_counter() - start}


def median_round(results: list[dict]) -> dict:
    """The round with the median step time (the peak RSS is the largest of all rounds)."""
    ordered = sorted(results, key=lambda r: r["s_per_step"])
    return {**ordered[(len(ordered) - 1) // 2], "peak_rss_gib": max(r["peak_rss_gib"] for r in results)}


def table(base: dict, ours: dict, warmup: int) -> str:
    rows = [("generation tokens/s", "gen_tokens_per_s", "{:.1f}"), ("generated tokens/step", "gen_tokens_per_step",
                                                                    "{:.1f}"),
            ("generation s/step", "gen_s_per_step", "{:.2f}"), ("s/step (whole step)", "s_per_step", "{:.2f}"),
            ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}"), ("mean reward", "mean_reward", "{:.3f}"),
            ("process wall s (load+train)", "process_s", "{:.1f}")]
    lines = [f"GRPO: {base['steps']} steps of {BATCH} completions ({BATCH // GENERATIONS} prompts x {GENERATIONS}), "
             f"max {COMPLETION} new tokens, beta {BETA[0]:g} ({warmup} warm-up step(s) not timed)",
             f"| {'':28} | {'trl':>10} | {'martlet':>10} | {'ratio':>7} |",
             f"|{'-' * 30}|{'-' * 12}|{'-' * 12}|{'-' * 9}|"]
    for label, key, fmt in rows:
        ratio = ours[key] / base[key] if base[key] else float("nan")
        lines.append(f"| {label:28} | {fmt.format(base[key]):>10} | {fmt.format(ours[key]):>10} | {ratio:>6.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="steps not timed")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the sides in turn this many times (trl, martlet, trl, ...) and report each side's "
                             "median round: the host's speed drifts by ~20%% over minutes")
    parser.add_argument("--beta", type=float, default=0.0, help="the KL term's weight on both sides (0: no reference)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    BETA[0] = args.beta
    if args.side:  # a child process: one side, its numbers to --result
        result = SIDES[args.side](args.steps, args.out, args.warmup)
        with open(args.result, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        return
    rounds = [(run_side("baseline", args.steps, args.warmup), run_side("martlet", args.steps, args.warmup))
              for _ in range(args.rounds)]
    base, ours = median_round([r[0] for r in rounds]), median_round([r[1] for r in rounds])
    print(table(base, ours, args.warmup), flush=True)
    if args.rounds > 1:
        print("s/step ratio of each round (martlet/trl): "
              + ", ".join(f"{o['s_per_step'] / b['s_per_step']:.2f}x" for b, o in rounds), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"baseline": base, "martlet": ours, "rounds": rounds}, fh, indent=1)


if __name__ == "__main__":
    main()

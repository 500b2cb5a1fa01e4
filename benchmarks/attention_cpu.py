"""Attention for padding-free rows on a CPU: sdpa with transformers' block mask against Martlet's per-sample
attention (`martlet_varlen`), in one process, alternating, on the embedded SmolLM2 with LoRA on all linear
layers under bf16 autocast (what `martlet sft` runs on a CPU).

    HF_HUB_OFFLINE=1 python benchmarks/attention_cpu.py [--lengths 60,90,110,134] [--rounds 4]

Each round times two forward + backward passes of the same padding-free row with each implementation; it prints
every round, the best of each side, and the ratio. Alternating within one process keeps the host's drift out of
the ratio.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="60,90,110,134", help="sample lengths laid end to end in the row")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from martlet import patches
    from martlet.models.embedded import embedded_model_dir
    from martlet.train.varlen_attention import register
    from martlet.train.batching import PaddingFreeCollator

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", use_cache=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear",
                                             task_type="CAUSAL_LM")).train()
    for module in model.modules():  # as Martlet trains: bf16 activations straight into the adapters
        if hasattr(module, "lora_A"):
            patches.patch_attribute("peft_input_cast_off", module, "cast_input_dtype_enabled", False)
    lengths = [int(n) for n in args.lengths.split(",")]
    vocab = model.config.vocab_size
    batch = PaddingFreeCollator()([{"input_ids": torch.randint(5, vocab, (n,)).tolist()} for n in lengths])
    sides = {"sdpa": "sdpa", "martlet_varlen": register()}

    def passes() -> float:
        start = time.perf_counter()
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
        return (time.perf_counter() - start) / 2

    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, impl in sides.items():
            model.base_model.model.set_attn_implementation(impl)
            passes()  # warm-up for this implementation
            times[name].append(passes())
    print(f"row of {sum(lengths)} tokens ({len(lengths)} samples: {args.lengths}), forward + backward, s:")
    for name, values in times.items():
        print(f"  {name:15} " + " ".join(f"{v:.3f}" for v in values) + f"   best {min(values):.3f}")
    print(f"ratio martlet_varlen / sdpa (best of each): {min(times['martlet_varlen']) / min(times['sdpa']):.2f}x")


if __name__ == "__main__":
    main()

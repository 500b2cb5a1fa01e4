"""Two variants of Martlet's LoRA SFT step side by side in one process, alternating, on the same batches.

    HF_HUB_OFFLINE=1 python benchmarks/step_ab.py --compare rounding [--rounds 6] [--batches 12] [--lora_dropout 0.05]
    HF_HUB_OFFLINE=1 python benchmarks/step_ab.py --compare node
    HF_HUB_OFFLINE=1 python benchmarks/step_ab.py --compare layer
    HF_HUB_OFFLINE=1 python benchmarks/step_ab.py --compare native --against HEAD~1

The embedded SmolLM2-135M-Instruct with LoRA r8 / alpha 32 on every linear layer, fused and on packed weights as
`martlet sft` trains it (bf16 where the CPU computes it), the benchmark's SFT data (`sft_throughput.SFT_DATA`)
encoded with the model's template, 4 samples a batch laid in one padding-free row with their shared system prompt
once. Each variant runs every batch forward + backward once to warm up, then the rounds alternate the variants;
the median round of each and the ratio are printed, with a check that both give the same loss. Side by side in one
process because the host's speed drifts by 10-20% over minutes.

--compare rounding: rows rounded up to 64 tokens (what runs where a product is not packed) against rows as long
as their tokens (`kernels.row_multiple` on packed weights). --compare node: the fused LoRA layer's autograd node in
Python (`kernels.LoraLinear`) against its C++ node (`martlet::lora_linear`), the same bits. --compare layer: each
decoder layer through its own forward (its modules' nodes, `MARTLET_FUSED_LAYER=0`) against one node a layer
(`martlet::decoder_layer`, train/fused_layer.py), the same bits. --compare native --against REV: the native kernels
of git revision REV (its `martlet_native.cpp`, built beside this tree's under another op namespace and loaded in the
same process) against this tree's, the Python the same: what a change to the kernels alone buys.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def batches(tokenizer, count: int, rows: int = 4) -> list[list[dict]]:
    """`count` batches of `rows` encoded samples of the SFT benchmark's data (a fixed shuffle)."""
    from martlet.data.preprocess import load_rows
    from martlet.templates import get_template

    from sft_throughput import SFT_DATA

    template = get_template(None, tokenizer, max_length=512)
    samples = load_rows(SFT_DATA, seed=42, model_name=["Martlet"], model_author=["Birdhouse"])  # (as the benchmark)
    random.Random(0).shuffle(samples)
    encoded = (template.encode(row["messages"]) for row in samples)
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if e is not None][:count * rows]
    return [features[i:i + rows] for i in range(0, len(features), rows)]


def lora_model(dropout: float):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from martlet.models.dtype import resolve_dtype
    from martlet.models.embedded import embedded_model_dir
    from martlet.train import fused_layer, kernels, native, varlen_attention

    dtype = torch.bfloat16 if resolve_dtype("AUTO", "cpu") == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=dtype, use_cache=False,
                                                 attn_implementation=varlen_attention.register())
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=dropout))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    kernels.fuse_lora(model)
    native.fuse_native(model)
    fused_layer.fuse_decoder_layers(model)
    return model.train(), dtype


def native_ops(revision: str):
    """(this tree's `torch.ops.martlet`, revision's kernels built and loaded as `torch.ops.martlet_against`)."""
    import subprocess
    import tempfile
    from pathlib import Path

    import torch

    from martlet.train import native

    ours = native.ops()
    assert ours is not None, "the native kernels are off on this machine (native.wanted())"
    here = Path(native.SOURCE).resolve()  # (git reads `REV:./name` relative to the folder it runs in)
    text = subprocess.run(["git", "-C", str(here.parent), "show", f"{revision}:./{here.name}"],
                          capture_output=True, text=True, check=True).stdout
    assert "TORCH_LIBRARY(martlet," in text, f"{revision}: no TORCH_LIBRARY(martlet, ...) in its source"
    with tempfile.TemporaryDirectory() as folder:  # (the build goes to Martlet's cache, named by this text)
        source = Path(folder) / "martlet_native_against.cpp"
        source.write_text(text.replace("TORCH_LIBRARY(martlet,", "TORCH_LIBRARY(martlet_against,"))
        library = native.build(source=source)
    torch.ops.load_library(str(library))
    return ours, torch.ops.martlet_against


def variants(compare: str, features: list[list[dict]], against: str | None = None):
    """{name: (rows, switch)}: each variant's padding-free rows and a function that puts the code in its state."""
    from martlet.train import kernels, native
    from martlet.train.batching import PaddingFreeCollator

    def rows(multiple: int) -> list[dict]:
        return [PaddingFreeCollator(multiple, 0, share_prefixes=True)(batch) for batch in features]

    if compare == "rounding":
        return {"rows rounded to 64": (rows(64), lambda: None), "rows as they are": (rows(1), lambda: None)}
    unrounded = rows(1)
    if compare == "native":
        ours, theirs = native_ops(against)
        return {f"native kernels of {against}": (unrounded, lambda: native._loaded.__setitem__("ops", theirs)),
                "this tree's native kernels": (unrounded, lambda: native._loaded.__setitem__("ops", ours))}
    if compare == "layer":
        return {"layers' own forward": (unrounded, lambda: os.environ.__setitem__("MARTLET_FUSED_LAYER", "0")),
                "one node a layer": (unrounded, lambda: os.environ.pop("MARTLET_FUSED_LAYER", None))}
    python_node = lambda x, base, a, b, scaling, p: kernels.LoraLinear.apply(  # noqa: E731
        x, base.weight, base.bias, a, b, scaling, p)
    c_node = kernels._lora_linear
    os.environ["MARTLET_FUSED_LAYER"] = "0"  # (the LoRA nodes run inside the layers' own forward)
    return {"LoRA node in Python": (unrounded, lambda: setattr(kernels, "_lora_linear", python_node)),
            "LoRA node in C++": (unrounded, lambda: setattr(kernels, "_lora_linear", c_node))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("rounding", "node", "layer", "native"), required=True)
    parser.add_argument("--against", default="HEAD", help="--compare native: the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    args = parser.parse_args()
    import torch

    from martlet.models.embedded import embedded_model_dir
    from martlet.models.loader import load_tokenizer
    from martlet.train import packed
    from martlet.train.loss import causal_lm_loss

    model, dtype = lora_model(args.lora_dropout)
    sides = variants(args.compare, batches(load_tokenizer(embedded_model_dir()), args.batches), args.against)
    times: dict[str, list[float]] = {name: [] for name in sides}
    losses: dict[str, float] = {}

    def run(name: str) -> float:
        rows, switch = sides[name]
        switch()
        torch.manual_seed(0)  # the same dropout masks each way
        start, total = time.perf_counter(), 0.0
        for row in rows:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = causal_lm_loss(model, row)
            loss.backward()
            total += loss.item()
        losses[name] = total
        return (time.perf_counter() - start) / len(rows)

    with packed.packed_frozen_weights(model):
        for name in sides:
            run(name)  # warm-up: every shape built, every kernel loaded
        for _ in range(args.rounds):
            for name in sides:
                times[name].append(run(name))
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, t in times.items():
        print(f"{name}: {medians[name]:.1f} ms a row (rounds {', '.join(f'{x * 1e3:.1f}' for x in t)}), "
              f"{sum(r['input_ids'].shape[1] for r in sides[name][0])} tokens in {len(sides[name][0])} rows")
    first, second = sides
    print(f"{second} against {first}: {medians[first] / medians[second]:.3f}x; summed losses "
          f"{losses[first]:.4f} and {losses[second]:.4f}")


if __name__ == "__main__":
    main()

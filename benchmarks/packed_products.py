"""Matrix products on frozen weights packed for oneDNN (`martlet.train.packed`) against torch's own, per shape, side by
side in one invocation, on the embedded SmolLM2's weight shapes.

    python benchmarks/packed_products.py [--dtype bf16,fp32] [--rows 1,8,128,320,512] [--repeats 5]

For each weight shape of the model (out x in: the attention's q/o, k/v, the MLP's gate/up and down, the LM head) and
each row count: the forward product x W^T (torch's `linear` on the plain weight, then `packed.linear` on the packed
copy) and the input's gradient dy W (`dy @ W`, then `packed.input_grad`), best of `--repeats` timed loops, and the
ratio torch / packed (above 1: the packed product is faster). Training runs 128-512 rows a product on the
benchmark's data (a padding-free row of 4 samples), generation one row a sequence. `--cpu_isa avx2` as in
sft_throughput.py (set the variables before torch loads: ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2).
"""

from __future__ import annotations

import argparse
import os
import time

EMULATE = {"avx2": {"MARTLET_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                    "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def seconds(fn, repeats: int) -> float:
    """Best time of one call over `repeats` loops (each long enough to time: ~20 ms), after a warm-up."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.02:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16,fp32")
    parser.add_argument("--rows", default="1,8,128,320,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu_isa", choices=["native", *EMULATE])
    args = parser.parse_args()
    os.environ.update(EMULATE.get(args.cpu_isa or "native", {}))

    import torch

    from martlet.train import native, packed

    print(f"CPU features: {', '.join(native.cpu_features()) or 'none of avx2/avx512/amx/asimd/sve'}; "
          f"torch threads: {torch.get_num_threads()}")
    shapes = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
              "down 576x1536": (576, 1536), "LM head 49152x576": (49152, 576)}
    print("| dtype | weight | rows | x W^T torch / packed (us) | ratio | dy W torch / packed (us) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype_name in args.dtype.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        if not packed.usable(dtype):
            print(f"| {dtype_name} | (the packed products are not available here: see the warning) | | | | | |")
            continue
        for name, (out, inp) in shapes.items():
            weight = torch.randn(out, inp).to(dtype)
            copy = packed.PackedWeight.of(weight)
            for rows in (int(r) for r in args.rows.split(",")):
                x, dy = torch.randn(rows, inp).to(dtype), torch.randn(rows, out).to(dtype)
                weight.__dict__.pop("_martlet_packed", None)
                plain = (seconds(lambda: torch.nn.functional.linear(x, weight), args.repeats),
                         seconds(lambda: dy @ weight, args.repeats))
                weight._martlet_packed = copy
                fast = (seconds(lambda: packed.linear(x, weight), args.repeats),
                        seconds(lambda: packed.input_grad(dy, weight), args.repeats))
                print(f"| {dtype_name} | {name} | {rows} | {plain[0] * 1e6:.1f} / {fast[0] * 1e6:.1f} | "
                      f"{plain[0] / fast[0]:.2f}x | {plain[1] * 1e6:.1f} / {fast[1] * 1e6:.1f} | "
                      f"{plain[1] / fast[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

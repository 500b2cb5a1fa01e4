"""The LM head and its loss (`kernels.LinearCrossEntropy`: product, softmax, input gradient, chunk by chunk) at two
chunk sizes side by side in one invocation, on a packed bf16 head as Martlet's LoRA training runs it on a CPU.

    python benchmarks/loss_head.py [--vocab 49152] [--hidden 576] [--rows 145,262,400,560,1024] [--chunks 1024,256]
                                   [--rounds 7]

For each row count (the labelled tokens of a step: SmolLM2's SFT rows hold ~150-260, DPO's ~340, packed or longer
rows more), forward + backward of the summed cross-entropy at each chunk size, alternating, the median of `--rounds`
(the first dropped), the ratio of the first chunk size's time to each other's, and each chunk's logits (the largest
buffer the loss holds at once). The defaults are the embedded SmolLM2's head (49,152 x 576); `--vocab 151936
--hidden 896` is Qwen2.5-0.5B's.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--rows", default="145,262,400,560,1024")
    parser.add_argument("--chunks", default="1024,256")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import torch

    from martlet.train import packed
    from martlet.train.kernels import LinearCrossEntropy

    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).to(torch.bfloat16)
    if packed.usable(torch.bfloat16):
        weight._martlet_packed = packed.PackedWeight.of(weight)  # as `packed.packed_frozen_weights` leaves it
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"head {args.vocab} x {args.hidden} bf16, {'packed' if packed.packed_copy_of(weight) else 'not packed'}; "
          f"forward + backward, median of {args.rounds - 1} rounds")
    for rows in (int(r) for r in args.rows.split(",")):
        hidden = torch.randn(rows, args.hidden, dtype=torch.bfloat16, requires_grad=True)
        target = torch.randint(0, args.vocab, (rows,))
        times: dict[int, list[float]] = {c: [] for c in chunks}
        for _ in range(args.rounds):
            for chunk in chunks:
                start = time.perf_counter()
                LinearCrossEntropy.apply(hidden, weight, None, target, chunk).backward()
                times[chunk].append(time.perf_counter() - start)
        medians = {c: statistics.median(t[1:]) * 1e3 for c, t in times.items()}
        first = chunks[0]
        print(f"{rows:5d} rows: " + "; ".join(
            f"chunk {c}: {medians[c]:.1f} ms ({medians[first] / medians[c]:.2f}x), logits "
            f"{min(c, rows) * args.vocab * 2 / 2**20:.0f} MiB" for c in chunks))


if __name__ == "__main__":
    main()

"""Generation tokens/s of batched dataset inference (Martlet's TransformersEngine, left-padded batches)
against generating the same prompts one at a time with plain transformers, on the embedded SmolLM2.

    HF_HUB_OFFLINE=1 python benchmarks/infer_throughput.py [--rows 24] [--batch 8] [--max_new_tokens 48] [--rounds 3]

Both sides use the same loaded model, the same prompts and greedy decoding; tokens are those of the
replies (up to the end of turn), counted the same way for both. It also prints how many replies agree
(all of them in fp32; in bf16 a padded batch rounds differently, so a few greedy replies can diverge).
On a CPU the engine's weights are packed for oneDNN as `martlet infer` does (`train/packed.py`); the engine also
runs with them unpacked, in turn (`--rounds`), and the packing's ratio is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24, help="prompts (from the built-in general-instruct set)")
    parser.add_argument("--batch", type=int, default=16, help="Martlet's --max_batch_size (its default: 16)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1,
                        help="the engine with its weights packed and unpacked in turn this many times (median)")
    parser.add_argument("--dtype", default="AUTO", choices=("AUTO", "fp32", "bf16"),
                        help="AUTO: what `martlet infer` picks (bf16 on CPUs with AVX512-BF16, else fp32)")
    args = parser.parse_args()

    import torch

    from martlet.data.sources import load_dataset_rows
    from martlet.infer.engine import TransformersEngine
    from martlet.models.dtype import resolve_dtype
    from martlet.infer.generation import GenConfig
    from martlet.models.loader import load_model, load_tokenizer, resolve_model
    from martlet.templates import get_template
    from martlet.train.packed import pack_for_inference

    spec = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(spec.model_dir)
    dtype = resolve_dtype(args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(spec, dtype=dtype, device_map="auto" if torch.cuda.is_available() else None).eval()
    template = get_template("AUTO", tokenizer)
    rows = load_dataset_rows("general-instruct")[: args.rows]
    prompts = [[m for m in row["messages"] if m["role"] != "assistant"][:2] for row in rows]
    prompts = [p if p[-1]["role"] == "user" else p[:1] for p in prompts]

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # plain transformers, one prompt at a time
    def one(messages):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    one(prompts[0])  # warm-up
    start = time.perf_counter()
    plain = [one(p) for p in prompts]
    plain_s = time.perf_counter() - start

    engine = TransformersEngine(model, template, max_batch_size=args.batch)
    config = GenConfig(max_new_tokens=args.max_new_tokens, do_sample=False)
    packed_layers = pack_for_inference(model) if model.device.type == "cpu" else 0  # as `martlet infer` does
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):  # the engine with its weights packed and without, in turn
        for packed in (False, True):
            with weights_unpacked(model, not packed):
                engine.generate(prompts[:1], config)  # warm-up
                start = time.perf_counter()
                batched = [output.text for output in engine.generate(prompts, config)]
                times[packed].append(time.perf_counter() - start)
    batched_s = sorted(times[True])[len(times[True]) // 2]

    plain_tokens = sum(count(t) for t in plain)
    batched_tokens = sum(count(t) for t in batched)
    same = sum(a.strip() == b.strip() for a, b in zip(plain, batched))
    print(f"model: {spec.model_type} ({dtype}), {len(prompts)} prompts, max_new_tokens={args.max_new_tokens}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"plain transformers, one at a time: {plain_tokens} tokens in {plain_s:.1f} s = "
          f"{plain_tokens / plain_s:.1f} tokens/s")
    print(f"martlet engine, batches of {args.batch}:   {batched_tokens} tokens in {batched_s:.1f} s = "
          f"{batched_tokens / batched_s:.1f} tokens/s")
    print(f"ratio: {(batched_tokens / batched_s) / (plain_tokens / plain_s):.2f}x; "
          f"identical replies: {same}/{len(prompts)}")
    if packed_layers:
        unpacked_s = sorted(times[False])[len(times[False]) // 2]
        print(f"the engine's weights packed for oneDNN ({packed_layers} linear layers) against unpacked, median of "
              f"{args.rounds} rounds in turn: {batched_s:.2f} vs {unpacked_s:.2f} s, {unpacked_s / batched_s:.2f}x "
              f"(rounds {', '.join(f'{u / p:.2f}x' for u, p in zip(times[False], times[True]))})")


@contextlib.contextmanager
def weights_unpacked(model, unpacked: bool):
    """Inside, when `unpacked`, the model's linear layers run without their packed copies (`train/packed.py`)."""
    held = {}
    if unpacked:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(getattr(weight, "__dict__", None), dict) and "_martlet_packed" in weight.__dict__:
                held[weight] = weight.__dict__.pop("_martlet_packed")
    try:
        yield
    finally:
        for weight, copy in held.items():
            weight._martlet_packed = copy


if __name__ == "__main__":
    main()

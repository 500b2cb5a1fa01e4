"""Generation tokens/s of batched dataset inference (Martlet's TransformersEngine, left-padded batches)
against generating the same prompts one at a time with plain transformers, on the embedded SmolLM2.

    HF_HUB_OFFLINE=1 python benchmarks/infer_throughput.py [--rows 24] [--batch 8] [--max_new_tokens 48]

Both sides use the same loaded model, the same prompts and greedy decoding; tokens are those of the
replies (up to the end of turn), counted the same way for both. It also prints how many replies agree
(all of them in fp32; in bf16 a padded batch rounds differently, so a few greedy replies can diverge).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24, help="prompts (from the built-in general-instruct set)")
    parser.add_argument("--batch", type=int, default=16, help="Martlet's --max_batch_size (its default: 16)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
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
    engine.generate(prompts[:1], config)  # warm-up
    start = time.perf_counter()
    batched = [output.text for output in engine.generate(prompts, config)]
    batched_s = time.perf_counter() - start

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


if __name__ == "__main__":
    main()

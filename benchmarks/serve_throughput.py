"""Throughput of `martlet deploy` with 1 client and with 16 concurrent clients (dynamic batching), and the ratio.

    HF_HUB_OFFLINE=1 python benchmarks/serve_throughput.py [--requests 32] [--clients 16] [--max_tokens 32]

The server runs in this process (uvicorn in a thread, on a free 127.0.0.1 port) on the embedded SmolLM2
(or --model); clients use the official `openai` package, greedy decoding, the same prompts (the built-in
general-instruct questions) in both runs. Tokens are the server's own `usage.completion_tokens`. It also
prints how many replies are identical in both runs (all of them in fp32; bf16 batches round differently).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def start(app):
    """(base URL, stop()) of `app` served by uvicorn in a thread."""
    import uvicorn

    from martlet.serve.main import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join()

    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", stop


def run(client, prompts, clients: int, max_tokens: int):
    """(replies, completion tokens, seconds) of every prompt asked by `clients` concurrent clients."""
    def ask(prompt):
        reply = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, prompts))
    seconds = time.perf_counter() - start
    return [r[0] for r in results], sum(r[1] for r in results), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder or type (default: the embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=32, help="requests per run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the second run")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=16, help="the server's --max_batch_size")
    parser.add_argument("--dtype", default="fp32", choices=("AUTO", "fp32", "bf16"))
    args = parser.parse_args()

    import openai
    import torch

    from martlet.args.serve import DeployArguments
    from martlet.data.sources import load_dataset_rows
    from martlet.serve.main import create_deploy_app

    deploy = DeployArguments(model_id_or_path=args.model, served_model_name="bench", dtype=args.dtype,
                             max_batch_size=args.max_batch_size).validate()
    url, stop = start(create_deploy_app(deploy))
    rows = load_dataset_rows("general-instruct")
    questions = [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows]
    prompts = [questions[i % len(questions)] for i in range(args.requests)]
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        run(client, prompts[:2], 1, 4)  # warm-up
        one, one_tokens, one_s = run(client, prompts, 1, args.max_tokens)
        many, many_tokens, many_s = run(client, prompts, args.clients, args.max_tokens)
    finally:
        stop()
    print(f"model: {deploy.model_id_or_path or 'smollm2-135m-instruct'} ({args.dtype}), {args.requests} requests, "
          f"max_tokens={args.max_tokens}, --max_batch_size {args.max_batch_size}, torch threads="
          f"{torch.get_num_threads()}")
    print(f" 1 client:  {one_tokens} tokens in {one_s:.1f} s = {one_tokens / one_s:.1f} tokens/s, "
          f"{args.requests / one_s:.2f} requests/s")
    print(f"{args.clients:2d} clients: {many_tokens} tokens in {many_s:.1f} s = {many_tokens / many_s:.1f} tokens/s, "
          f"{args.requests / many_s:.2f} requests/s")
    print(f"ratio: {(many_tokens / many_s) / (one_tokens / one_s):.2f}x; identical replies: "
          f"{sum(a == b for a, b in zip(one, many))}/{len(one)}")


if __name__ == "__main__":
    main()

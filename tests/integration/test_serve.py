"""`martlet deploy`'s server, for real: uvicorn on a free 127.0.0.1 port, a tiny llama with two LoRA adapters
trained by `martlet sft`, and the official `openai` client (sync, async, streamed). Replies are compared
with the engine `martlet infer` uses, loaded on its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers import build_tiny_model, write_jsonl  # noqa: E402

KEY = "sk-martlet-test"
MAX = 12  # max_tokens of the equality checks
PROMPTS = ["Hello there", "What is 2+2?", "Tell me a story about a cat.", "Why is the sky blue?",
           "Name three fruits.", "Translate 'bonjour' to English.", "Write a haiku about rain.", "Who are you?"]


# helpers (the browser test uses them too) ---------------------------------------------------------------
def build_noisy_tiny(folder: str, tokenizer_dir: str) -> str:
    """A tiny llama whose weights are N(0, 0.2): unlike the default init (replies of blank lines), its greedy
    replies differ from prompt to prompt, so equality tests compare something."""
    import torch
    from transformers import AutoModelForCausalLM

    build_tiny_model("llama", folder, tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def train_adapter(model_dir: str, root, answer: str) -> str:
    """A LoRA checkpoint of `martlet sft` that learned to answer everything with `answer`."""
    from martlet.llm import SftArguments, sft_main

    os.makedirs(root, exist_ok=True)
    data = write_jsonl(os.path.join(root, "data.jsonl"),
                       [{"query": f"Question {i}?", "response": answer} for i in range(8)])
    result = sft_main(SftArguments(model_id_or_path=model_dir, dataset=[data], max_steps=3, batch_size=2,
                                   gradient_accumulation_steps=1, output_dir=os.path.join(root, "out"),
                                   dataset_test_ratio=0, report_to=["none"], lora_target_modules=["ALL"],
                                   learning_rate=5e-2, dtype="fp32", disable_tqdm=True, save_steps=3))
    return result["last_model_checkpoint"]


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread; yields the base URL (http://127.0.0.1:PORT)."""
    import uvicorn

    from martlet.serve.main import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def noisy(tmp_path_factory, embedded_dir) -> str:
    return build_noisy_tiny(str(tmp_path_factory.mktemp("serve") / "noisy-tiny"), embedded_dir)


@pytest.fixture(scope="module")
def adapters(noisy, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": train_adapter(noisy, root / "alpha", "Alpha alpha alpha, the first adapter."),
            "beta": train_adapter(noisy, root / "beta", "Beta? Beta! Second adapter here.")}


@pytest.fixture(scope="module")
def server(noisy, adapters):
    from martlet.args.serve import DeployArguments
    from martlet.serve.main import create_deploy_app

    args = DeployArguments(model_id_or_path=noisy, served_model_name="tiny", dtype="fp32", api_key=KEY,
                           lora_modules=[f"{name}={path}" for name, path in adapters.items()],
                           max_body_bytes=64 * 1024).validate()
    app = create_deploy_app(args)
    with running(app) as url:
        yield SimpleNamespace(url=url, app=app, client=openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0))


def engine_of(**kwargs):
    from martlet.args.infer import InferArguments
    from martlet.infer.load import load_engine

    return load_engine(InferArguments(dtype="fp32", **kwargs).validate())


@pytest.fixture(scope="module")
def reference(noisy):
    """The engine of `martlet infer --model_id_or_path noisy`."""
    return engine_of(model_id_or_path=noisy)


def greedy(engine, messages, max_new_tokens=MAX, **kwargs) -> str:
    from martlet.infer.generation import GenConfig

    return engine.generate([messages], GenConfig(max_new_tokens=max_new_tokens, temperature=0, **kwargs))[0].text


def ask(client, text, model="tiny", **kwargs):
    return client.chat.completions.create(model=model, messages=user(text), **{"max_tokens": MAX, "temperature": 0,
                                                                               **kwargs})


# the API ----------------------------------------------------------------------------------------------
def test_health_and_models(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed
    assert [m.id for m in server.client.models.list()] == ["tiny", "alpha", "beta"]
    assert server.client.models.retrieve("beta").id == "beta"


def test_greedy_chat_equals_the_infer_engine_with_usage_and_finish_reason(server, reference):
    conversations = [user(p) for p in PROMPTS[:4]] + [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]]
    for messages in conversations:
        reply = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX, temperature=0)
        assert reply.object == "chat.completion" and reply.model == "tiny"
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == greedy(reference, messages)
        assert reply.usage.prompt_tokens == len(reference.template.encode_prompt(messages))
        assert reply.usage.completion_tokens == MAX and reply.choices[0].finish_reason == "length"
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + MAX


def test_a_stop_word_ends_the_reply_with_finish_reason_stop(server, reference):
    full = greedy(reference, user(PROMPTS[0]), max_new_tokens=24)
    stop = full.split()[2]
    expected = greedy(reference, user(PROMPTS[0]), max_new_tokens=24, stop_words=[stop])
    assert expected == full[: full.index(stop)]
    reply = ask(server.client, PROMPTS[0], stop=[stop], max_tokens=24)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert 0 < reply.usage.completion_tokens < 24
    chunks = list(ask(server.client, PROMPTS[0], stop=stop, max_tokens=24, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_chat_gives_the_same_reply_then_usage_then_done(server):
    whole = ask(server.client, PROMPTS[1])
    chunks = list(ask(server.client, PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    raw = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "tiny", "messages": user("x"), "max_tokens": 2, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_completions_batch_of_prompts_with_n(server, reference):
    import torch

    prompts = ["Once upon a time", "The capital of France is"]
    reply = server.client.completions.create(model="tiny", prompt=prompts, max_tokens=MAX, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    tokenizer = reference.tokenizer
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = reference.model.generate(**ids, max_new_tokens=MAX, do_sample=False)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)
        assert reply.choices[2 * i].text == reply.choices[2 * i + 1].text == expected
    assert reply.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert reply.usage.completion_tokens == 4 * MAX
    chunks = list(server.client.completions.create(model="tiny", prompt=prompts[0], max_tokens=MAX, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    by_ids = server.client.completions.create(model="tiny", prompt=tokenizer(prompts[0])["input_ids"],
                                              max_tokens=MAX, temperature=0)
    assert by_ids.choices[0].text == reply.choices[0].text


def test_async_client_plain_and_streamed_side_by_side(server, reference):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

        async def streamed(text):
            stream = await client.chat.completions.create(model="tiny", messages=user(text), max_tokens=MAX,
                                                          temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        async def plain(text):
            reply = await client.chat.completions.create(model="tiny", messages=user(text), max_tokens=MAX,
                                                         temperature=0)
            return reply.choices[0].message.content

        try:
            return await asyncio.gather(*[plain(p) for p in PROMPTS[:4]], *[streamed(p) for p in PROMPTS[:4]])
        finally:
            await client.close()

    expected = [greedy(reference, user(p)) for p in PROMPTS[:4]]
    assert asyncio.run(main()) == expected + expected


def test_32_concurrent_requests_equal_sequential_ones_and_are_batched(server):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    sequential = {p: ask(server.client, p).choices[0].message.content for p in PROMPTS}
    batchers = server.app.state.batchers.values()
    before = sum(b.batches for b in batchers)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda p: ask(server.client, p), prompts))
    assert [r.choices[0].message.content for r in replies] == [sequential[p] for p in prompts]
    batches = sum(b.batches for b in batchers) - before
    assert batches <= 16, f"32 concurrent requests took {batches} generate calls: no batching"


def test_each_adapter_answers_as_its_own_checkpoint(server, adapters, reference):
    own = {name: engine_of(ckpt_dir=path) for name, path in adapters.items()}
    expected = {name: [greedy(engine, user(p)) for p in PROMPTS[:3]] for name, engine in own.items()}
    expected["tiny"] = [greedy(reference, user(p)) for p in PROMPTS[:3]]
    assert expected["alpha"] != expected["beta"] and expected["alpha"] != expected["tiny"]
    jobs = [(name, i) for i in range(3) for name in ("alpha", "tiny", "beta")] * 2
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # interleaved: the gate switches adapters
        replies = list(pool.map(lambda job: ask(server.client, PROMPTS[job[1]], model=job[0]), jobs))
    for (name, i), reply in zip(jobs, replies):
        assert reply.choices[0].message.content == expected[name][i], (name, i)
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(server.client, PROMPTS[0], "beta", stream=True))
    assert streamed == expected["beta"][0]


def test_seeded_sampling_repeats_and_n_gives_several_choices(server):
    def sample():
        return server.client.chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=8,
                                                     temperature=1.0, top_p=0.9, n=3, seed=7)

    tiny_temperature = ask(server.client, PROMPTS[0], temperature=1e-300)  # greedy, not a division overflow
    assert tiny_temperature.choices[0].message.content == ask(server.client, PROMPTS[0]).choices[0].message.content
    first, second = sample(), sample()
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1 and first.usage.completion_tokens == 24


def test_closing_a_stream_stops_its_generation(server, monkeypatch):
    """A client that hangs up after a few chunks of a 980-token stream: generation ends there (the steps it ran
    are counted), not after all 980 tokens, and the adapter gate is free again."""
    from martlet.infer import engine as generation

    gate = server.app.state.models[0].engine.gate
    steps, ended = [], threading.Event()
    real = generation.generate_steps

    def counted(*args, **kwargs):
        inner = real(*args, **kwargs)
        try:
            for step in inner:
                steps.append(step)
                yield step
        finally:
            inner.close()  # waits for model.generate to return
            ended.set()

    monkeypatch.setattr(generation, "generate_steps", counted)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "alpha", "messages": user("Go on"), "max_tokens": 980, "temperature": 0,
                            "stream": True}, timeout=30) as response:
        lines = response.iter_lines()
        assert all(next(lines) is not None for _ in range(6))
        assert gate.holders == 1
    assert ended.wait(120), "the generation did not end"  # 980 tokens take seconds; a stopped one far less
    assert len(steps) < 980 // 2, f"the abandoned stream kept generating: {len(steps)} of 980 tokens"
    assert gate.holders == 0


# errors -----------------------------------------------------------------------------------------------
def post(server, path, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
        headers["Content-Type"] = "application/json"
    return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=30, **kwargs)


CHAT = "/v1/chat/completions"
LONG = " ".join(["word"] * 1500)  # more tokens than the tiny model's 1024 positions
BAD = [
    (CHAT, b"{not json", 400, "invalid_json", None),
    (CHAT, {"model": "tiny"}, 400, "missing_required_parameter", "messages"),
    (CHAT, {"model": "tiny", "messages": user("x"), "temperature": 9}, 400, "invalid_value", "temperature"),
    (CHAT, {"model": "tiny", "messages": user("x"), "n": 0}, 400, "invalid_value", "n"),
    (CHAT, {"model": "tiny", "messages": user("x"), "stream": True, "top_p": 7}, 400, "invalid_value", "top_p"),
    (CHAT, {"model": "tiny", "messages": user("x"), "bogus": 1}, 400, "unknown_parameter", "bogus"),
    (CHAT, {"model": "tiny", "messages": user("x"), "max_tokens": 5000}, 400, "context_length_exceeded", "max_tokens"),
    (CHAT, {"model": "nope", "messages": user("x")}, 404, "model_not_found", "model"),
    (CHAT, {"model": "tiny", "messages": user(LONG)}, 413, "context_length_exceeded", "messages"),
    (CHAT, {"model": "tiny", "messages": user("x" * 70_000)}, 413, "request_too_large", None),
    ("/v1/completions", {"model": "tiny", "prompt": [10 ** 9]}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": LONG, "stream": True}, 413, "context_length_exceeded", "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "n": 40, "best_of": 2}, 400, "unsupported_parameter",
     "best_of"),
    ("/v1/nothing", {}, 404, None, None),
]


@pytest.mark.parametrize("path, body, status, code, param", BAD, ids=[f"{b[2]}-{b[3]}" for b in BAD])
def test_bad_requests_get_their_status_and_an_openai_error(server, path, body, status, code, param):
    response = post(server, path, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")


def test_the_openai_client_raises_the_matching_errors_and_the_server_lives_on(server):
    with pytest.raises(openai.NotFoundError) as info:
        ask(server.client, "x", model="missing")
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        ask(server.client, "x", max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.APIStatusError) as info:
        ask(server.client, LONG)
    assert info.value.status_code == 413
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert ask(server.client, PROMPTS[0]).choices[0].finish_reason == "length"


def test_a_wrong_or_missing_key_gets_401(server):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    for call in (lambda: wrong.models.list(), lambda: ask(wrong, "x")):
        with pytest.raises(openai.AuthenticationError) as info:
            call()
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    response = post(server, CHAT, {"model": "tiny", "messages": user("x")}, key=None)
    assert response.status_code == 401 and response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_lora_checkpoint_served_by_ckpt_dir_with_another_adapter_beside_it(adapters):
    from martlet.args.serve import DeployArguments
    from martlet.serve.main import create_deploy_app

    args = DeployArguments(ckpt_dir=adapters["alpha"], lora_modules=[f"beta={adapters['beta']}"], dtype="fp32")
    expected = {name: greedy(engine_of(ckpt_dir=path), user(PROMPTS[1])) for name, path in adapters.items()}
    with running(create_deploy_app(args.validate())) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        names = [m.id for m in client.models.list()]
        assert names == [os.path.basename(adapters["alpha"]), "beta"]  # an unregistered model: the folder's name
        assert ask(client, PROMPTS[1], model=names[0]).choices[0].message.content == expected["alpha"]
        assert ask(client, PROMPTS[1], model="beta").choices[0].message.content == expected["beta"]

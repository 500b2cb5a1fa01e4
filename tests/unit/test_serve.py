"""The server's parts without a model: request checking, dynamic batching, the adapter gate, arguments."""

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")

from martlet.args.serve import DeployArguments  # noqa: E402
from martlet.errors import MartletError  # noqa: E402
from martlet.infer.adapters import AdapterGate  # noqa: E402
from martlet.serve.batching import Batcher, Job  # noqa: E402
from martlet.serve.errors import APIError  # noqa: E402
from martlet.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_body  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chat(**changes):
    return json.dumps({**CHAT, **changes}).encode()


def refused(cls, body) -> APIError:
    with pytest.raises(APIError) as info:
        parse_body(cls, body)
    assert info.value.status == 400
    return info.value


def test_a_valid_chat_request_reads_every_supported_field():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = parse_body(ChatCompletionRequest, chat(max_tokens=5, temperature=0.5, top_p=0.9, n=2, stop="x", seed=3,
                                                 stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "developer", "content": "be brief"},
                                                           {"role": "user", "content": parts}]))
    assert (req.max_tokens, req.n, req.stop_words(), req.seed, req.messages[1].text()) == (5, 2, ["x"], 3, "ab")
    assert parse_body(ChatCompletionRequest, chat(max_completion_tokens=7)).wanted_tokens() == 7


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (chat(messages=[]), "messages", "invalid_value"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role", "invalid_value"),
    (chat(messages=[{"role": "user", "content": 5}]), None, "invalid_value"),
    (chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]), "messages.1.role",
     "invalid_value"),
    (chat(temperature=-1), "temperature", "invalid_value"),
    (chat(temperature="hot"), "temperature", "invalid_value"),
    (chat(top_p=0), "top_p", "invalid_value"),
    (chat(max_tokens=0), "max_tokens", "invalid_value"),
    (chat(max_tokens="5"), "max_tokens", "invalid_value"),
    (chat(n=0), "n", "invalid_value"),
    (chat(n=1000), "n", "invalid_value"),
    (chat(stop=[""]), "stop", "invalid_value"),
    (chat(stop=["a"] * 17), "stop", "invalid_value"),
    (chat(stop="x" * 257), "stop", "invalid_value"),
    (chat(seed=2 ** 70), "seed", "invalid_value"),
    (chat(repetition_penalty=1e-300), "repetition_penalty", "invalid_value"),
    (chat(n=True), "n", "invalid_value"),
    (chat(logprobs=True), "logprobs", "unsupported_parameter"),
    (chat(frequency_penalty=0.5), "frequency_penalty", "unsupported_parameter"),
    (chat(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (chat(tools=[{"type": "function"}]), "tools", "unknown_parameter"),
    (json.dumps({"messages": CHAT["messages"]}).encode(), "model", "missing_required_parameter"),
])
def test_bad_chat_requests_are_400_naming_the_parameter(body, param, code):
    error = refused(ChatCompletionRequest, body)
    assert error.code == code
    if param is not None:
        assert error.param == param
    assert error.body()["error"]["type"] == "invalid_request_error" and error.message


def test_completion_prompts_and_refusals():
    parse = lambda **kw: parse_body(CompletionRequest, json.dumps({"model": "m", **kw}).encode())  # noqa: E731
    assert parse(prompt="a").prompts() == ["a"]
    assert parse(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert parse(prompt=[1, 2]).prompts() == [[1, 2]]
    assert parse(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    for body, param in [({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": "a", "echo": True}, "echo"),
                        ({"prompt": "a", "best_of": 3}, "best_of"), ({"prompt": "a", "suffix": "z"}, "suffix")]:
        assert refused(CompletionRequest, json.dumps({"model": "m", **body}).encode()).param == param


def test_batcher_groups_jobs_with_the_same_key_up_to_max_rows():
    calls = []
    gate = threading.Event()

    def generate(rows, config, adapter):
        gate.wait(5)
        calls.append((list(rows), config, adapter))
        return [f"{adapter}:{r}" for r in rows]

    batcher = Batcher(generate, max_rows=4, window_s=0.05)
    try:
        jobs = [Job("a", [1], "cfg", "A"), Job("b", [2], "cfg", "B"), Job("a", [3, 4], "cfg", "A"),
                Job("a", [5, 6], "cfg", "A"), Job("a", [7], "cfg", "A")]
        futures = [batcher.submit(job) for job in jobs]
        gate.set()
        results = [f.result(5) for f in futures]
    finally:
        batcher.close(5)
    assert results == [["A:1"], ["B:2"], ["A:3", "A:4"], ["A:5", "A:6"], ["A:7"]]
    # oldest first; same key joins up to 4 rows; the other key waits its turn
    assert [c[0] for c in calls] == [[1, 3, 4, 7], [2], [5, 6]]


def test_batcher_hands_a_failure_to_every_job_of_the_batch_and_skips_cancelled_jobs():
    def generate(rows, config, adapter):
        if 0 in rows:
            raise ValueError("boom")
        return rows

    batcher = Batcher(generate, max_rows=8, window_s=0.05)
    try:
        bad = [batcher.submit(Job("k", [0], None, None)), batcher.submit(Job("k", [1], None, None))]
        for future in bad:
            with pytest.raises(ValueError):
                future.result(5)
        gone = Job("k", [2], None, None)
        gone.future.cancel()
        batcher.submit(gone)
        assert batcher.submit(Job("k", [3], None, None)).result(5) == [3]
    finally:
        batcher.close(5)
    with pytest.raises(RuntimeError):
        batcher.submit(Job("k", [4], None, None))


class FakePeft:
    """Records adapter switches; peft's PeftModel has these methods."""

    def __init__(self):
        self.peft_config = {"a": None, "b": None}
        self.active_adapter = "a"
        self.switches = []
        self.base_model = self

    def set_adapter(self, name):
        self.active_adapter = name
        self.switches.append(name)

    def enable_adapter_layers(self):
        pass

    def disable_adapter_layers(self):
        self.switches.append(None)


def _until(condition, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_adapter_gate_overlaps_same_adapter_and_serves_others_in_order():
    """"a" holds the gate; "b", then another "a", then the base model (None) queue up, each seen waiting in the
    gate before the next comes; once the first "a" leaves they run in arrival order ("a" may not jump the
    queue), one at a time, each with its own adapter active."""
    model = FakePeft()
    gate = AdapterGate(model)
    log, inside = [], []
    first_in, release = threading.Event(), threading.Event()

    def run(name, hold):
        with gate.use(name):
            inside.append(name)
            log.append((name, model.active_adapter if model.switches[-1:] != [None] else None, len(inside)))
            first_in.set()
            if hold:
                assert release.wait(10)
            inside.remove(name)

    def queued() -> int:
        with gate.cond:
            return len(gate.waiting)

    threads = [threading.Thread(target=run, args=("a", True))]
    threads[0].start()
    assert first_in.wait(10)
    for count, name in enumerate(("b", "a", None), start=1):  # "a" came after "b": it must not jump the queue
        threads.append(threading.Thread(target=run, args=(name, False)))
        threads[-1].start()
        _until(lambda: queued() + len(log) - 1 == count, f"request {count} to reach the gate")  # waiting or in
    assert [entry[0] for entry in log] == ["a"] and queued() == 3  # all three still wait
    release.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert [entry[0] for entry in log] == ["a", "b", "a", None]
    assert all(entry[0] == entry[1] for entry in log)  # each ran with its own adapter active
    assert all(entry[2] == 1 for entry in log[1:])  # no overlap across different adapters


def test_deploy_arguments_check_lora_modules(tmp_path):
    (tmp_path / "a").mkdir()
    args = DeployArguments(lora_modules=[f"x={tmp_path / 'a'}"])
    assert args.validate().lora_pairs() == [("x", str(tmp_path / "a"))]
    for bad in (["nopath"], ["=p"], [f"x={tmp_path / 'missing'}"], [f"x={tmp_path / 'a'}", f"x={tmp_path / 'a'}"]):
        with pytest.raises(MartletError, match="lora_modules"):
            DeployArguments(lora_modules=bad).validate()
    with pytest.raises(MartletError, match="port"):
        DeployArguments(port=70000).validate()
    with pytest.raises(MartletError, match="vllm"):
        DeployArguments(lora_modules=[f"x={tmp_path / 'a'}"], infer_backend="vllm").validate()

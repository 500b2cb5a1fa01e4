"""The server under load and under fuzzing: `martlet deploy` in its own process (its memory is measured),
1,000 requests from 16 concurrent clients (good, malformed, and streams dropped mid-way), then a
schemathesis run over the server's own OpenAPI schema: no request may get a 500."""

from __future__ import annotations

import collections
import json
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")

from integration.test_serve import build_noisy_tiny, engine_of, greedy, user  # noqa: E402

KEY = "sk-soak"
Server = collections.namedtuple("Server", "url proc model replies")
SAY = ["Say something.", "Name three fruits.", "Why is the sky blue? Tell me.", "Hi"]  # several prompt lengths
REQUESTS, CLIENTS = 1000, 16
AUTH = {"Authorization": f"Bearer {KEY}"}


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_dir):
    model = build_noisy_tiny(str(tmp_path_factory.mktemp("soak") / "tiny"), embedded_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "martlet.cli", "deploy", "--model_id_or_path", model,
                             "--served_model_name", "tiny", "--dtype", "fp32", "--api_key", KEY, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.5)
    # greedy replies of `martlet infer`'s engine, loaded here on its own: what every good request must get
    reference = engine_of(model_id_or_path=model)
    replies = {prompt: greedy(reference, user(prompt), max_new_tokens=4) for prompt in SAY}
    assert len(set(replies.values())) == len(SAY), replies  # a reply given to the wrong request shows
    yield Server(url, proc, model, replies)
    proc.terminate()
    proc.wait(timeout=60)


def _chat(prompt: str = SAY[0], **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
            "temperature": 0, **extra}


# (kind, body, expected status); "drop" opens a stream and closes it after the first chunk; good requests are
# greedy: each gets its prompt's reference reply (every choice of n=2 too)
CASES = ([("good", _chat(p), 200) for p in SAY] + [("good", {**_chat(p), "stream": True}, 200) for p in SAY]
         + [("good", _chat(p, n=2), 200) for p in SAY]
         + [("bad", b"{not json", 400), ("bad", _chat(max_tokens=-1), 400), ("bad", _chat(model="missing"), 404),
            ("bad", {"model": "tiny"}, 400), ("bad", _chat(temperature="hot"), 400), ("drop", None, 200)])
WEIGHTS = [50 / len(SAY)] * len(SAY) + [10 / len(SAY)] * len(SAY) + [5 / len(SAY)] * len(SAY) + [5, 5, 5, 5, 5, 10]


def _one(client: httpx.Client, url: str, replies: dict, kind: str, body, status: int) -> tuple[str, bool]:
    path = f"{url}/v1/chat/completions"
    if kind == "drop":
        with client.stream("POST", path, json={**_chat(max_tokens=200), "stream": True}, headers=AUTH) as resp:
            ok = resp.status_code == 200
            next(resp.iter_lines())  # read one line, then hang up mid-stream
        return kind, ok
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = client.post(path, content=content, headers={**AUTH, "Content-Type": "application/json"})
    if resp.status_code != status:
        return kind, False
    if kind == "good":
        want = replies[body["messages"][0]["content"]]
        if body.get("stream"):
            lines = [line for line in resp.text.splitlines() if line.startswith("data: ")]
            text = "".join(c["delta"].get("content") or "" for line in lines[:-1]
                           for c in json.loads(line[len("data: "):])["choices"])
            return kind, lines[-1] == "data: [DONE]" and len(lines) >= 2 and text == want
        choices = resp.json()["choices"]
        return kind, len(choices) == body.get("n", 1) and all(c["message"]["content"] == want for c in choices)
    error = resp.json().get("error", {})
    return kind, bool(error.get("message")) and error.get("type") == "invalid_request_error"


def test_soak_1000_requests_from_16_clients(server):
    url, proc = server.url, server.proc
    rng = random.Random(0)
    plan = rng.choices(CASES, weights=WEIGHTS, k=REQUESTS)
    rss = []

    def client_loop(index: int) -> list[tuple[str, bool]]:
        results = []
        with httpx.Client(timeout=60) as client:
            for kind, body, status in plan[index::CLIENTS]:
                results.append(_one(client, url, server.replies, kind, body, status))
        return results

    warm = [_one(httpx.Client(timeout=60), url, server.replies, *case) for case in CASES * 3]  # warm-up: every kind once or more
    assert all(ok for _, ok in warm), warm
    rss.append(_rss_kib(proc.pid))
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for chunk in pool.map(client_loop, range(CLIENTS)) for r in chunk]
    rss.append(_rss_kib(proc.pid))

    assert len(results) == REQUESTS
    failed = [kind for kind, ok in results if not ok]
    assert not failed, f"{len(failed)} requests did not get their answer: {failed[:10]}"
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
    # memory: what 1,000 requests add after the warm-up stays small (no per-request leak)
    grown_mib = (rss[1] - rss[0]) / 1024
    assert grown_mib < 150, f"server RSS grew by {grown_mib:.0f} MiB over {REQUESTS} requests"
    print(f"\nsoak: {REQUESTS} requests, {CLIENTS} clients, server RSS {rss[0] / 1024:.0f} -> {rss[1] / 1024:.0f} MiB")


def test_schemathesis_finds_no_server_error(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    from martlet.args.serve import DeployArguments
    from martlet.serve.main import create_deploy_app

    url = server.url
    # the server publishes no /openapi.json (a smaller surface); the same app object describes itself
    app = create_deploy_app(DeployArguments(model_id_or_path=server.model, served_model_name="tiny", dtype="fp32",
                                            api_key=KEY).validate())
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    seen = []
    for op in operations:
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            response = case.call(base_url=url, headers=AUTH, timeout=60)
            seen.append((op.path, response.status_code))
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:99]}"

        check()
    assert len(seen) >= 2 * len(operations)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200

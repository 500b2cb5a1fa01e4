"""`martlet deploy` as a command: on the real SmolLM2 its greedy answers equal `martlet infer`'s, SIGTERM lets
the request in flight finish before the process exits 0, and a port in use is a one-line error."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")

from helpers import write_jsonl  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a primary color."]
MAX = 12
LONG = 160  # tokens of the reply in flight at the SIGTERM: seconds of generation


def launch(*argv: str):
    """`martlet deploy --port 0 ...` started: (process, log lines, event set once it listens)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # it shares the CPU with the reference run
    proc = subprocess.Popen([sys.executable, "-m", "martlet", "deploy", "--port", "0", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log: list[str] = []
    listening = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            log.append(line)
            if "API at http://" in line:
                listening.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, log, listening


def wait_listening(proc, log, listening, timeout: float = 180) -> str:
    """The base URL, once the server listens."""
    deadline = time.monotonic() + timeout
    while not listening.wait(0.05):  # the event, or every 50 ms a look at whether the process died
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("martlet deploy did not start:\n" + "".join(log)[-3000:])
    return re.search(r"API at (http://\S+)/v1", "".join(log)).group(1)


@pytest.mark.slow
def test_deploy_on_smollm2_answers_as_infer_and_stops_gracefully_on_sigterm(tmp_path, embedded_dir):
    from martlet.args.infer import InferArguments
    from martlet.llm import infer_main

    proc, log, listening = launch("--dtype", "fp32", "--served_model_name", "smol")
    try:
        # the reference while the server loads: `martlet infer` on the same questions, greedy
        data = write_jsonl(tmp_path / "questions.jsonl", [{"query": q, "response": "-"} for q in QUESTIONS])
        result = infer_main(InferArguments(dataset=[data], dataset_test_ratio=0, max_new_tokens=MAX, temperature=0,
                                           dtype="fp32", save_result=False, verbose=False))
        url = wait_listening(proc, log, listening)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        served = [client.chat.completions.create(model="smol", messages=[{"role": "user", "content": q}],
                                                 max_tokens=MAX, temperature=0).choices[0].message.content
                  for q in QUESTIONS]
        # a streamed request: its first chunk says it is being generated when the SIGTERM comes
        stream = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "Tell me about the sea."}], max_tokens=LONG,
            temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)  # the rest of the reply, after the signal
        assert proc.wait(60) == 0, "".join(log)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == LONG and finish == ["length"]
    assert "server stopped" in "".join(log)
    assert [row["response"] for row in result["result"]] == served
    assert "Paris" in served[0]


def test_a_port_in_use_is_a_one_line_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        done = subprocess.run([sys.executable, "-m", "martlet", "deploy", "--port", port], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr

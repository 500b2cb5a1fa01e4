"""`martlet infer` with no dataset is an interactive chat: driven here through a pseudo-terminal with the
embedded SmolLM2 (type a question, read the streamed answer, clear, multi-line, Ctrl-C, quit)."""

import os
import signal
import sys
import time

import pytest

pexpect = pytest.importorskip("pexpect")


def test_chat_in_a_terminal(embedded_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # started with SIGINT ignored, as a shell script's background job is: Ctrl-C must still stop a reply
    chat = pexpect.spawn(sys.executable, ["-m", "martlet", "infer", "--dtype", "fp32"], env=env,
                         encoding="utf-8", timeout=90, dimensions=(40, 200),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        chat.expect("<<< ")
        chat.sendline("What is the capital of France?")
        chat.expect("Paris")  # streamed into the terminal
        chat.expect("<<< ")
        assert "<|im_end|>" not in chat.before

        chat.sendline("clear")
        chat.expect("History cleared.")
        chat.expect("<<< ")

        chat.sendline("multi-line")
        chat.expect(r"<<<\[M\] ")
        chat.sendline("Write a very long story")
        chat.sendline("about a brave dragon.#")
        chat.expect(r"dragon\.#\r\n")  # the echo of what was typed
        chat.expect(r"\w+ \w+ \w+", timeout=60)  # the story has started streaming
        time.sleep(0.5)
        chat.sendintr()  # Ctrl-C stops the reply, not the session
        chat.expect(r"\[stopped\]")
        chat.expect(r"<<<\[M\] ")
        assert chat.isalive()

        chat.sendline("single-line#")
        chat.expect("<<< ")
        chat.sendline("quit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0

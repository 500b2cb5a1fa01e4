"""The interactive chat of `martlet infer` (no dataset given): multi-turn, streamed replies.

Commands typed at the prompt: `clear` forgets the history, `multi-line` / `single-line` switch the
input mode (a multi-line message ends with a line ending in `#`), `exit` or `quit` leaves. Ctrl-C
while a reply is generated stops it and returns to the prompt; Ctrl-D (end of input) leaves.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Optional, TextIO

from martlet.infer.generation import GenConfig
from martlet.infer.protocol import Engine

HELP = ("Chat with the model. Commands: `clear` (forget the history), `multi-line` / `single-line` (input mode; "
        "end a multi-line message with #), `exit` or `quit`. Ctrl-C stops a reply.")


def read_message(read: Callable[[str], str], multi_line: bool) -> str:
    """One message: a line, or (multi-line) lines up to one that ends with '#'."""
    if not multi_line:
        return read("<<< ")
    lines = []
    prompt = "<<<[M] "
    while True:
        line = read(prompt)
        prompt = ""
        if line.rstrip().endswith("#"):
            lines.append(line.rstrip()[:-1])
            return "\n".join(lines)
        lines.append(line)


def chat_loop(engine: Engine, config: Optional[GenConfig] = None, *, system: Optional[str] = None, stream: bool = True,
              read: Callable[[str], str] = input, out: Optional[TextIO] = None) -> list[dict]:
    """Chat until exit/quit or end of input; returns the conversation (messages) at the end."""
    with _ctrl_c_raises():
        return _chat(engine, config, system, stream, read, out or sys.stdout)


@contextlib.contextmanager
def _ctrl_c_raises():
    """Ctrl-C stops a reply even when the chat was started with SIGINT ignored (a process started in the
    background by a shell script inherits that, and Python then leaves it ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _chat(engine: Engine, config: Optional[GenConfig], system: Optional[str], stream: bool, read: Callable[[str], str],
          out: TextIO) -> list[dict]:
    history: list[dict] = []
    multi_line = False
    print(HELP, file=out, flush=True)
    while True:
        try:
            text = read_message(read, multi_line)
        except EOFError:
            print(file=out)
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt
            print(file=out)
            continue
        command = text.strip().lower()
        if command in ("exit", "quit"):
            break
        if command == "clear":
            history = []
            print("History cleared.", file=out, flush=True)
            continue
        if command in ("multi-line", "single-line"):
            multi_line = command == "multi-line"
            print(f"Input mode: {command}" + (" (end your message with #)." if multi_line else "."), file=out,
                  flush=True)
            continue
        if not text.strip():
            continue
        head = [{"role": "system", "content": system}] if system is not None else []
        messages = head + history + [{"role": "user", "content": text}]
        reply = _reply(engine, messages, config, stream, out)
        if reply:  # a reply stopped before its first word leaves no turn behind
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    return history


def _reply(engine: Engine, messages: list[dict], config: Optional[GenConfig], stream: bool, out: TextIO) -> str:
    """Show the reply as it is generated; Ctrl-C keeps what was shown so far."""
    reply = ""
    try:
        if stream:
            with contextlib.closing(engine.stream([messages], config)) as deltas:
                for delta in deltas:
                    if delta.text:
                        reply += delta.text
                        out.write(delta.text)
                        out.flush()
        else:
            reply = engine.generate([messages], config)[0].text
            out.write(reply)
    except KeyboardInterrupt:
        out.write(" [stopped]")
    print(file=out, flush=True)
    return reply

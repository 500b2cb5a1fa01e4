"""An Ollama Modelfile beside a GGUF: FROM the file, the chat template as a Go template, stop tokens, system.

Ollama templates are Go templates, chat templates are jinja: no general translation exists. Most chat
formats are "a prefix, the content, a suffix" per role, so the jinja template is rendered on probe
conversations and those pieces are cut out of the text. The Go template built from them is then checked
by rendering the same conversations the way Ollama will; when the two differ (a format the pieces do not
describe), the Modelfile gets no TEMPLATE and Ollama falls back to the chat template inside the GGUF.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Sequence

from martlet.errors import MartletError
from martlet.export.gguf_vocab import adds_token

logger = logging.getLogger("martlet")

_S, _U1, _A1, _U2, _A2, _U3 = (f"MARTLET{i}PROBE" for i in ("SYS", "USR1", "AST1", "USR2", "AST2", "USR3"))


@dataclasses.dataclass(frozen=True)
class ChatPieces:
    """A chat format as literal text around each message ("" where nothing is written)."""

    user_prefix: str  # before each user message
    user_suffix: str  # after each user message, up to where the reply starts (the generation prompt)
    assistant_prefix: str  # before each earlier assistant message, after the generation prompt
    assistant_suffix: str  # after each assistant message (the end-of-turn marker)
    system_prefix: str  # before the system prompt
    system_suffix: str  # after the system prompt
    system_in_first_user: bool  # the system prompt sits inside the first user message (Mistral, Gemma)
    default_system: Optional[str]  # what the template writes when the conversation has no system message
    head: str  # text before everything (a literal BOS)

    def render(self, messages: Sequence[dict[str, str]], system: Optional[str]) -> str:
        """What Ollama renders with the Go template of these pieces: `system` is Ollama's .System."""
        out = [self.head]
        if system and not self.system_in_first_user:
            out.append(self.system_prefix + system + self.system_suffix)
        first = True
        for message in messages:
            if message["role"] == "user":
                out.append(self.user_prefix)
                if first and system and self.system_in_first_user:
                    out.append(self.system_prefix + system + self.system_suffix)
                first = False
                out.append(message["content"] + self.user_suffix)
            elif message["role"] == "assistant":
                out.append(self.assistant_prefix + message["content"] + self.assistant_suffix)
        return "".join(out)


def _between(text: str, start: str | None, end: str | None) -> str:
    i = text.index(start) + len(start) if start else 0
    j = text.index(end, i) if end else len(text)
    return text[i:j]


def chat_pieces(render: Any, bos: Optional[str] = None) -> ChatPieces:
    """Cut the pieces out of `render(messages, add_generation_prompt)`; MartletError when they do not fit.

    `bos` is the tokenizer's BOS text: a template that starts with it gets it as `head`.
    """
    def msgs(*pairs):
        return [{"role": role, "content": content} for role, content in pairs]

    try:
        one = render(msgs(("user", _U1)), True)
        two = render(msgs(("user", _U1), ("assistant", _A1), ("user", _U2)), True)
        closed = render(msgs(("user", _U1), ("assistant", _A1)), False)
        with_system = render(msgs(("system", _S), ("user", _U1)), True)
    except Exception as exc:  # a template may raise on any of these
        raise MartletError(f"the chat template cannot render a probe conversation: {exc}") from None
    user_suffix = _between(one, _U1, None)
    assistant_suffix = _between(closed, _A1, None)
    between = _between(two, _U1, _A1)
    turn = _between(two, _A1, _U2)
    if not (turn.startswith(assistant_suffix) and between.startswith(user_suffix)):
        raise MartletError("turns are not written the same way each time.")
    assistant_prefix = between[len(user_suffix):]
    user_prefix = turn[len(assistant_suffix):]
    # a template that opens with the BOS text writes it once, before everything (unless every turn has it)
    opens_with_bos = bool(bos) and one.startswith(bos) and with_system.startswith(bos)
    head = bos if opens_with_bos and not user_prefix.startswith(bos) else ""
    before_user = _between(one, None, _U1)[len(head):]
    if not before_user.endswith(user_prefix):
        raise MartletError("the first user message is written differently from the others.")
    default = before_user[: len(before_user) - len(user_prefix)]
    before_system = _between(with_system, None, _S)[len(head):]
    after_system = _between(with_system, _S, _U1)
    if user_prefix and before_system.startswith(user_prefix):  # the system prompt opens the first user message
        if default:
            raise MartletError("a default system prompt inside the first user message is not supported.")
        return ChatPieces(user_prefix, user_suffix, assistant_prefix, assistant_suffix,
                          before_system[len(user_prefix):], after_system, True, None, head)
    if not after_system.endswith(user_prefix):
        raise MartletError("cannot tell where the system prompt ends.")
    system_suffix = after_system[: len(after_system) - len(user_prefix)]
    default_system = None
    if default:
        if not (default.startswith(before_system) and default.endswith(system_suffix)):
            raise MartletError("the default system prompt is written differently from a given one.")
        default_system = default[len(before_system): len(default) - len(system_suffix)]
    return ChatPieces(user_prefix, user_suffix, assistant_prefix, assistant_suffix, before_system, system_suffix, False,
                      default_system, head)


_CHECKS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


def verify(pieces: ChatPieces, render: Any) -> None:
    """Raise MartletError unless the pieces render every check conversation as the jinja template does."""
    for messages in _CHECKS:
        system = messages[0]["content"] if messages[0]["role"] == "system" else pieces.default_system
        turns = [m for m in messages if m["role"] != "system"]
        if pieces.render(turns, system) != render(messages, True):
            raise MartletError("the pieces do not reproduce the chat template.")


def _literal(text: str) -> str:
    """Text inside a Go template: raw when safe, else a quoted Go string action."""
    if "{{" in text or "}}" in text or '"""' in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def go_template(pieces: ChatPieces) -> str:
    """The Ollama TEMPLATE: .System, then .Messages, each message wrapped in its pieces."""
    lit = _literal
    system = "{{ if .System }}" + lit(pieces.system_prefix) + "{{ .System }}" + lit(pieces.system_suffix) + "{{ end }}"
    user = lit(pieces.user_prefix)
    if pieces.system_in_first_user:
        user += ("{{ if and $first $.System }}" + lit(pieces.system_prefix) + "{{ $.System }}"
                 + lit(pieces.system_suffix) + "{{ end }}{{ $first = false }}")
    user += "{{ .Content }}" + lit(pieces.user_suffix)
    loop = ('{{ range .Messages }}{{ if eq .Role "user" }}' + user + '{{ else if eq .Role "assistant" }}'
            + lit(pieces.assistant_prefix) + "{{ .Content }}" + lit(pieces.assistant_suffix) + "{{ end }}{{ end }}")
    start = "{{ $first := true }}" if pieces.system_in_first_user else system
    return lit(pieces.head) + start + loop


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile_text(gguf_name: str, template: Optional[str], system: Optional[str], stops: Sequence[str],
                   parameters: dict[str, Any], note: str = "") -> str:
    lines = ["# Ollama Modelfile written by `martlet export`.",
             f"# Create the model with: ollama create NAME -f {os.path.join('.', 'Modelfile')}", "",
             f"FROM ./{gguf_name}", ""]
    if template is not None:
        lines += [f'TEMPLATE """{template}"""', ""]
    elif note:
        lines += [f"# No TEMPLATE: {note}", "# Ollama then uses the chat template stored in the GGUF.", ""]
    if system:
        if '"""' in system:
            raise MartletError('the system prompt contains """, which a Modelfile cannot hold.', field="system")
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in dict.fromkeys(stops)]
    lines += [f"PARAMETER {key} {value}" for key, value in parameters.items()]
    return "\n".join(lines) + "\n"


def _sampling(model_dir: str) -> dict[str, Any]:
    """Ollama parameters from the model's generation_config.json (greedy -> temperature 0)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    if config.get("do_sample") is False or ("do_sample" not in config and "temperature" not in config):
        return {}
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    return {ollama: config[hf] for hf, ollama in names.items() if config.get(hf) is not None}


def write_modelfile(out_dir: str, gguf_name: str, template: Any, *, system: Optional[str],
                    model_dir: str) -> dict[str, Any]:
    """Write `out_dir/Modelfile` for the GGUF `gguf_name` and the martlet Template `template`."""
    def render(messages, add_generation_prompt):
        return template.tokenizer.apply_chat_template(messages, chat_template=template.chat_template,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)

    go, note, pieces = None, "", None
    tokenizer = template.tokenizer
    try:
        pieces = chat_pieces(render, tokenizer.bos_token)
        verify(pieces, render)
        if pieces.head and adds_token(tokenizer, tokenizer.bos_token_id, 0):  # llama.cpp adds the BOS token itself
            pieces = dataclasses.replace(pieces, head="")
        go = go_template(pieces)
    except MartletError as exc:
        note = f"the chat template could not be translated to Ollama's ({exc.message})"
        logger.warning("Modelfile: %s; Ollama will use the template inside the GGUF.", note)
    if system is None and pieces is not None:
        system = pieces.default_system
    text = modelfile_text(gguf_name, go, system, template.stop_words, _sampling(model_dir), note)
    path = os.path.join(out_dir, "Modelfile")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return {"path": path, "template": go, "system": system, "stops": list(dict.fromkeys(template.stop_words))}

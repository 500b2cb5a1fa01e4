"""Chat templates and loss masks, defined together.

The jinja chat template is the truth: the tokenizer's own, or a named one from `templates.json` for
models that ship none. A conversation is rendered once per assistant turn to find where each reply
starts; each piece is tokenized on its own, so the labels are exactly the assistant replies plus their
end-of-turn marker, and the prompt tokens equal what generation sees.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import os
import sys
from typing import Any, Sequence

from martlet.errors import MartletError, did_you_mean

IGNORE_INDEX = -100
_DIR = os.path.dirname(__file__)
_PROBE = "MARTLET-PROBE-REPLY"
SHOW_STYLES = ("auto", "ansi", "plain", "html")
_ANSI_LOSS, _ANSI_RESET = "\033[1;32m", "\033[0m"  # loss spans in bold green, the rest as it is
# named templates are registered at run time too (martlet.llm.register_template)
_extra: dict[str, dict[str, Any]] = {}


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, dict[str, Any]]:
    with open(os.path.join(_DIR, "templates.json"), encoding="utf-8") as fh:
        return json.load(fh)


def template_names() -> list[str]:
    return sorted({**_builtin(), **_extra})


def template_entry(name: str) -> dict[str, Any]:
    """A named template's data, with its jinja text under 'jinja'."""
    entries = {**_builtin(), **_extra}
    if name not in entries:
        raise MartletError(f"unknown template '{name}'.{did_you_mean(name, entries)}", field="template_type",
                           hint=f"Known templates: {', '.join(sorted(entries))}, or AUTO for the tokenizer's own.")
    entry = dict(entries[name])
    if "jinja" not in entry:
        with open(os.path.join(_DIR, entry["file"]), encoding="utf-8") as fh:
            entry["jinja"] = fh.read()
    return entry


def register_template(name: str, chat_template: str, *, eot: str | None = None, default_system: str | None = None,
                      stop_words: Sequence[str] = (), exist_ok: bool = False) -> None:
    """Add a named template (a jinja chat template) at run time."""
    if name in template_names() and not exist_ok:
        raise MartletError(f"template '{name}' is already registered.", hint="Pass exist_ok=True to replace it.")
    _extra[name] = {"jinja": chat_template, "eot": eot, "default_system": default_system,
                    "stop_words": list(stop_words)}


@dataclasses.dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class Template:
    """Renders conversations for one tokenizer; `encode` gives (input_ids, labels)."""

    def __init__(self, tokenizer: Any, chat_template: str, *, name: str, eot: str | None = None,
                 system: str | None = None, stop_words: Sequence[str] = (), max_length: int | None = None,
                 truncation_strategy: str = "delete"):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template_type = name
        self.system = system
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.eot = eot if eot is not None else self._detect_eot()
        stops = [s for s in (*stop_words, self.eot, tokenizer.eos_token) if s]
        self.stop_words = list(dict.fromkeys(stops))

    # rendering ---------------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises its own classes (and raise_exception messages)
            raise MartletError(f"template '{self.template_type}' cannot render this conversation: {exc}") from None

    def with_system(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """`--system` replaces the template's default system prompt when the row has none."""
        messages = list(messages)
        if self.system is not None and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def _detect_eot(self) -> str | None:
        """The special token that closes an assistant turn in this template, if any."""
        convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self.render(convo)
        except MartletError:
            return None
        tail = text[text.rfind(_PROBE) + len(_PROBE):].lstrip(" ")
        specials = sorted(set(self.tokenizer.all_special_tokens) | set(getattr(self.tokenizer, "added_tokens_encoder", {})),
                          key=len, reverse=True)
        return next((tok for tok in specials if tok and tail.startswith(tok)), None)

    # encoding ----------------------------------------------------------------------------------------
    def segments(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
                 ) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, carries_loss) pieces, in order.

        Training encodes a conversation ending with an assistant turn; generation encodes one ending with
        a user turn plus the generation prompt. Both cut the history at the same places, so the prompt
        tokens of a multi-turn chat equal the tokens the model was trained on.
        """
        messages = self.with_system(messages)
        full = self.render(messages, add_generation_prompt=add_generation_prompt)
        pieces: list[tuple[str, bool]] = []
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= done):
                raise MartletError(f"template '{self.template_type}' renders earlier turns differently as the "
                                   "conversation grows, so loss masks cannot be computed for it.",
                                   field="template_type", hint="Pick another --template_type.")
            reply = upto[len(prompt):]
            cut = reply.rfind(self.eot) + len(self.eot) if self.eot and self.eot in reply else len(reply)
            pieces += [(prompt[done:], False), (reply[:cut], True), (reply[cut:], False)]
            done = len(upto)
        pieces.append((full[done:], False))
        return [(text, loss) for text, loss in pieces if text]

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, messages: Sequence[dict[str, str]]) -> Encoded | None:
        """Token ids and labels (-100 where no loss); None when too long and the strategy is 'delete'."""
        if not any(m["role"] == "assistant" for m in messages):
            raise MartletError("the conversation has no assistant turn to learn from.")
        input_ids: list[int] = []
        labels: list[int] = []
        for text, loss in self.segments(messages):
            ids = self._tokenize(text)
            input_ids += ids
            labels += ids if loss else [IGNORE_INDEX] * len(ids)
        return self._truncate(Encoded(input_ids, labels))

    def encode_text(self, text: str) -> Encoded | None:
        """Plain text for continued pre-training: every token (and a closing eos) carries loss."""
        ids = self._tokenize(text)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return self._truncate(Encoded(ids, list(ids)))

    def _truncate(self, enc: Encoded) -> Encoded | None:
        if self.max_length is None or len(enc.input_ids) <= self.max_length:
            return enc
        if self.truncation_strategy == "delete":
            return None
        keep = self.max_length  # truncation_left: drop the oldest tokens
        enc = Encoded(enc.input_ids[-keep:], enc.labels[-keep:])
        return enc if any(label != IGNORE_INDEX for label in enc.labels) else None

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation ending with a user turn, followed by the generation prompt."""
        return [t for text, _ in self.segments(messages, add_generation_prompt=True) for t in self._tokenize(text)]

    # seeing the mask ----------------------------------------------------------------------------------
    def show(self, conversation: Sequence[dict[str, str]] | str, style: str = "auto") -> str:
        """The conversation as training encodes it, with the loss-carrying spans marked.

        It decodes `encode`'s own ids and labels (plain text: `encode_text`'s), so it cannot disagree with
        training. `style`: 'ansi' (bold green), 'plain' («…»), 'html' (<mark>…</mark>, the rest escaped), or
        'auto' (ansi on a terminal, else plain).
        """
        if isinstance(conversation, str):
            enc = self.encode_text(conversation)
        else:
            enc = self.encode(conversation)
        if enc is None:
            note = f"(dropped: longer than max_length={self.max_length} tokens)"
            return html.escape(note) if style == "html" else note
        return mark_spans(self.loss_spans(enc), style)

    def loss_spans(self, enc: Encoded) -> list[tuple[str, bool]]:
        """The encoded tokens decoded as (text, carries_loss) runs: a token carries loss when its label is
        not -100. Each run is cut from the decoded prefix, so a run's text is what its tokens add."""
        carries = [label != IGNORE_INDEX for label in enc.labels]
        cuts = [0] + [i for i in range(1, len(carries)) if carries[i] != carries[i - 1]] + [len(carries)]
        prefixes = [self._decode(enc.input_ids[:cut]) for cut in cuts]
        spans = []
        for i in range(len(cuts) - 1):
            before, upto = prefixes[i], prefixes[i + 1]
            own = upto[len(before):] if upto.startswith(before) else None
            text = own if own is not None else self._decode(enc.input_ids[cuts[i]:cuts[i + 1]])
            spans.append((text, carries[cuts[i]]))
        return spans

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def resolve_style(style: str) -> str:
    """'auto' is 'ansi' on a terminal (unless NO_COLOR is set), else 'plain'; other styles stay as they are."""
    if style not in SHOW_STYLES:
        raise MartletError(f"unknown style '{style}'.{did_you_mean(style, SHOW_STYLES)}",
                           hint=f"Choose one of {', '.join(SHOW_STYLES)}.")
    if style == "auto":
        return "ansi" if sys.stdout.isatty() and not os.environ.get("NO_COLOR") else "plain"
    return style


def mark_spans(spans: Sequence[tuple[str, bool]], style: str = "auto") -> str:
    """(text, carries_loss) spans as one text, the loss spans marked in `style` (see Template.show)."""
    style = resolve_style(style)
    if style == "html":
        return "".join(f"<mark>{html.escape(t)}</mark>" if loss else html.escape(t) for t, loss in spans)
    if style == "plain":
        return "".join(f"«{t}»" if loss else t for t, loss in spans)
    # ansi: colour each line of a span on its own, so a pager or a scrolled terminal keeps the colour right
    return "".join("\n".join(f"{_ANSI_LOSS}{line}{_ANSI_RESET}" if line else line for line in t.split("\n"))
                   if loss else t for t, loss in spans)


GET_TEMPLATE_KEYWORDS = ("template_type", "tokenizer", "default_system", "max_length", "truncation_strategy",
                         "fallback")


def get_template(template_type: str | None, tokenizer: Any, default_system: str | None = None,
                 max_length: int | None = None, truncation_strategy: str = "delete", *,
                 fallback: str = "default", **unknown: Any) -> Template:
    """The template named `template_type`; 'AUTO' (or None) takes the tokenizer's own chat template,
    else `fallback` (the registry's template for the model type). Any other keyword is an error."""
    if unknown:
        name = sorted(unknown)[0]
        raise MartletError(f"get_template() has no keyword '{name}'.{did_you_mean(name, GET_TEMPLATE_KEYWORDS)}",
                           hint=f"It takes {', '.join(GET_TEMPLATE_KEYWORDS)}.")
    if template_type in (None, "AUTO", "tokenizer"):
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own:
            return Template(tokenizer, own, name="tokenizer", system=default_system, max_length=max_length,
                            truncation_strategy=truncation_strategy)
        template_type = fallback
    entry = template_entry(template_type)
    eot = tokenizer.eos_token if entry.get("eot_is_eos") else entry.get("eot")
    return Template(tokenizer, entry["jinja"], name=template_type, eot=eot, system=default_system,
                    stop_words=entry.get("stop_words") or (), max_length=max_length,
                    truncation_strategy=truncation_strategy)

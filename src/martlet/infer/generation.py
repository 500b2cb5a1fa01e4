"""Generation settings of one request, and where a reply ends (stop words).

`GenConfig` is what an engine receives: every field left None falls back to the model's own
generation_config.json. Stop words are cut from the text here, for whole replies and for streams.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Sequence

from martlet.args.infer import GenerationArguments
from martlet.errors import MartletError

DEFAULT_MAX_NEW_TOKENS = 2048
_SAMPLING = ("temperature", "top_k", "top_p")


@dataclasses.dataclass
class GenConfig:
    max_new_tokens: Optional[int] = None
    do_sample: Optional[bool] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    num_beams: Optional[int] = None
    stop_words: list = dataclasses.field(default_factory=list)
    seed: Optional[int] = None  # reseed before this request (reproducible sampling)

    @classmethod
    def from_args(cls, args: GenerationArguments) -> "GenConfig":
        """The generation fields of InferArguments (GenerationArguments and the classes built on it)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "seed"]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    @classmethod
    def from_any(cls, config: Any = None, **overrides: Any) -> "GenConfig":
        """From None, a GenConfig, a dict or a transformers GenerationConfig, then keyword overrides."""
        if config is None:
            base = cls()
        elif isinstance(config, GenConfig):
            base = copy.deepcopy(config)
        elif isinstance(config, dict):
            base = cls(**config)
        else:  # a transformers GenerationConfig: take what it sets explicitly
            diff = config.to_diff_dict() if hasattr(config, "to_diff_dict") else vars(config)
            base = cls(**{f.name: diff[f.name] for f in dataclasses.fields(cls) if f.name in diff})
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise MartletError(f"unknown generation setting(s): {', '.join(sorted(unknown))}.",
                               hint=f"Known: {', '.join(f.name for f in dataclasses.fields(cls))}.")
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def to_hf(self, base: Any, *, eos_token_ids: Sequence[int], pad_token_id: Optional[int]):
        """A transformers GenerationConfig: the model's own `base`, with the values set here on top."""
        from transformers import GenerationConfig

        config = copy.deepcopy(base) if base is not None else GenerationConfig()
        for name in ("max_new_tokens", "do_sample", "repetition_penalty", "num_beams", *_SAMPLING):
            value = getattr(self, name)
            if value is not None:
                setattr(config, name, value)
        if self.temperature == 0:
            config.do_sample = False
        if config.max_new_tokens is None:
            config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
            config.max_length = None
        if not config.do_sample:  # greedy: sampling knobs would only raise warnings
            config.temperature, config.top_k, config.top_p = None, None, None
        own = base.eos_token_id if base is not None else None
        own = own if isinstance(own, list) else ([own] if own is not None else [])
        config.eos_token_id = list(dict.fromkeys([*own, *eos_token_ids]))
        config.pad_token_id = pad_token_id if pad_token_id is not None else (config.eos_token_id or [None])[0]
        return config


def cut_at_stop(text: str, stop_words: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop word, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop_words if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def whole_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of `ids` up to its last whole character. A character of several bytes (Chinese, an emoji) may
    be spread over several tokens: until its last byte comes, decoding shows U+FFFD in its place, and a reply
    that max_tokens cuts there would end in it. A U+FFFD the model itself wrote at the very end goes too."""
    return tokenizer.decode(list(ids), skip_special_tokens=False).rstrip("\ufffd")


def held_back(text: str, stop_words: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop word (not shown yet)."""
    keep = 0
    for stop in stop_words:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    if text[len(text) - keep - 1: len(text) - keep] == "\ufffd":  # half a UTF-8 character: wait for the rest
        keep += 1
    return keep


class StreamText:
    """Turns the token ids of one reply, as they arrive, into text deltas that never show a stop word nor a part
    of a character (incomplete bytes wait for the rest, and are dropped if the reply ends first)."""

    def __init__(self, tokenizer: Any, stop_words: Sequence[str], stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop_words = [s for s in stop_words if s]
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def _text(self) -> str:
        text, found = cut_at_stop(whole_text(self.tokenizer, self.ids), self.stop_words)
        self.stopped = self.stopped or found
        return text

    def add(self, ids: Sequence[int]) -> str:
        """The new text safe to show after these ids."""
        for token in ids:
            if self.stopped or token in self.stop_ids:
                self.stopped = True
                break
            self.ids.append(token)
        text = self._text()
        if not self.stopped:
            text = text[: len(text) - held_back(text, self.stop_words)]
        return self._delta(text)

    def finish(self) -> str:
        """Whatever is left once generation has ended."""
        return self._delta(self._text())

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

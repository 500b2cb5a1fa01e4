"""The one interface every engine offers: dataset evaluation, the chat loop, the server and the UIs use it.

A prompt is a conversation (messages, rendered by the engine's Template) or token ids already rendered.
`generate` returns an Output per prompt (text, token counts, why it ended); `stream` yields Deltas of
every prompt's reply as it is generated, each prompt ending with a Delta that carries its Output.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Iterator, Optional, Protocol, Sequence, Union

from martlet.infer.adapters import AS_LOADED
from martlet.infer.generation import GenConfig
from martlet.templates.template import Template

Conversation = Sequence[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...], ending with a user turn
Prompt = Union[Conversation, Sequence[int]]  # a conversation, or the token ids of a rendered prompt


@dataclasses.dataclass
class Output:
    """One finished reply: `completion_tokens` counts up to and including the token that ended it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclasses.dataclass
class Delta:
    """A piece of prompt `index`'s reply while streaming; `output` is set on the prompt's last Delta."""

    index: int
    text: str
    output: Optional[Output] = None


def is_token_ids(prompt: Prompt) -> bool:
    """Whether `prompt` is token ids (else a conversation)."""
    return all(isinstance(item, int) for item in prompt)


class Engine(Protocol):
    """What every engine offers (transformers, vLLM; an HTTP client could have the same shape)."""

    template: Template
    tokenizer: Any
    max_batch_size: int  # how many prompts one generation may hold
    context_length: Optional[int]  # prompt plus reply, in tokens (None: unknown)
    vocab_size: int

    def encode_chat(self, messages: Conversation) -> list[int]:
        """The token ids of `messages` plus the generation prompt, as the Template renders them (not cut)."""

    def encode_text(self, text: str) -> list[int]:
        """The token ids of a plain-text prompt."""

    def model_defaults(self) -> GenConfig:
        """The settings of the model's own generation config (what a None field of a GenConfig falls back to)."""

    def generate(self, prompts: Sequence[Prompt], config: Optional[GenConfig] = None, *,
                 adapter: Optional[str] = AS_LOADED) -> list[Output]:
        """One Output per prompt, in order. `adapter` names the LoRA adapter to use (None: the base model)."""

    def stream(self, prompts: Sequence[Prompt], config: Optional[GenConfig] = None, *,
               adapter: Optional[str] = AS_LOADED, cancel: Optional[threading.Event] = None) -> Iterator[Delta]:
        """Deltas of every prompt's reply as they come; closing the iterator (or setting `cancel`) stops it."""


def replies(engine: Engine, prompts: Sequence[Prompt], config: Optional[GenConfig] = None) -> list[str]:
    """The text of each prompt's reply."""
    return [output.text for output in engine.generate(prompts, config)]

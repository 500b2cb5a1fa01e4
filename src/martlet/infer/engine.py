"""Inference engines: load once, generate replies for a batch of conversations, stream one.

`Engine` is the interface that dataset evaluation, the chat loop, the server and the UIs use.
`TransformersEngine` runs a loaded transformers (or peft) model: prompts are rendered by the
Template, left padded into batches and generated together; stop words end each reply.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any, Iterator, Optional, Protocol, Sequence

from martlet.infer.generation import GenConfig, StreamText, cut_at_stop, whole_text
from martlet.templates.template import Template

logger = logging.getLogger("martlet")
Conversation = Sequence[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...], ending with a user turn


class Engine(Protocol):
    """What every engine offers (transformers now; vLLM, or an HTTP client, with the same shape)."""

    template: Template

    def generate(self, conversations: Sequence[Conversation], config: Optional[GenConfig] = None) -> list[str]:
        """One reply per conversation, in order."""

    def stream(self, conversation: Conversation, config: Optional[GenConfig] = None) -> Iterator[str]:
        """The reply to one conversation as text deltas; closing the iterator stops generation."""


class TransformersEngine:
    """An Engine over a loaded causal LM (plain or peft), its Template and batches of `max_batch_size`."""

    def __init__(self, model: Any, template: Template, *, max_batch_size: int = 16):
        self.model = model
        self.template = template
        self.tokenizer = template.tokenizer
        self.max_batch_size = max_batch_size

    # prompts -------------------------------------------------------------------------------------------
    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """Token ids of the rendered conversation plus the generation prompt (the oldest cut if too long)."""
        ids = self.template.encode_prompt(conversation)
        limit = self.template.max_length
        if limit and len(ids) > limit:
            logger.warning("prompt of %d tokens is longer than max_length=%d: its oldest tokens are dropped.",
                           len(ids), limit)
            ids = ids[-limit:]
        return ids

    def _left_pad(self, prompts: Sequence[list[int]]):
        import torch

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            if ids:
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
        device = _device_of(self.model)
        return input_ids.to(device), mask.to(device)

    # stop words ----------------------------------------------------------------------------------------
    def _stops(self, config: GenConfig) -> tuple[list[str], list[int], list[str]]:
        """(all stop words, ids of those that are one special token, those that are not)."""
        words = list(dict.fromkeys([*self.template.stop_words, *config.stop_words]))
        special = set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab())
        ids, strings = [], []
        for word in words:
            token_id = self.tokenizer.convert_tokens_to_ids(word) if word in special else None
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.append(token_id)
            else:
                strings.append(word)
        return words, ids, strings

    def _generate_kwargs(self, config: GenConfig) -> tuple[dict[str, Any], list[str], list[int]]:
        words, ids, strings = self._stops(config)
        hf_config = config.to_hf(getattr(self.model, "generation_config", None), eos_token_ids=ids,
                                 pad_token_id=self.tokenizer.pad_token_id)
        kwargs: dict[str, Any] = {"generation_config": hf_config}
        if strings:  # stop words of several tokens: transformers matches them on the text
            hf_config.stop_strings = strings
            kwargs["tokenizer"] = self.tokenizer
        if config.seed is not None:
            import torch

            torch.manual_seed(config.seed)
        return kwargs, words, list(hf_config.eos_token_id)

    def _decode(self, ids: Sequence[int], words: Sequence[str], stop_ids: Sequence[int]) -> str:
        stop_ids = set(stop_ids)
        end = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
        return cut_at_stop(whole_text(self.tokenizer, ids[:end]), words)[0]

    # the interface -------------------------------------------------------------------------------------
    def generate(self, conversations: Sequence[Conversation], config: Optional[GenConfig] = None) -> list[str]:
        import torch

        if not conversations:
            return []
        config = config or GenConfig()
        kwargs, words, stop_ids = self._generate_kwargs(config)
        prompts = [self.prompt_ids(c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
        replies: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start: start + self.max_batch_size]
            input_ids, mask = self._left_pad([prompts[i] for i in chunk])
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            for row, index in enumerate(chunk):
                replies[index] = self._decode(out[row, input_ids.shape[1]:].tolist(), words, stop_ids)
        return replies

    def stream(self, conversation: Conversation, config: Optional[GenConfig] = None) -> Iterator[str]:
        config = config or GenConfig()
        if (config.num_beams or getattr(self.model.generation_config, "num_beams", 1) or 1) > 1:
            yield self.generate([conversation], config)[0]  # beam search cannot stream: the reply at once
            return
        kwargs, words, stop_ids = self._generate_kwargs(config)
        input_ids, mask = self._left_pad([self.prompt_ids(conversation)])
        text = StreamText(self.tokenizer, words, stop_ids)
        with contextlib.closing(generate_steps(self.model, input_ids, mask, kwargs)) as steps:
            for ids in steps:
                delta = text.add(ids)
                if delta:
                    yield delta
                if text.stopped:
                    break
        tail = text.finish()
        if tail:
            yield tail


def generate_steps(model: Any, input_ids: Any, mask: Any, kwargs: dict[str, Any], *,
                   halt: Optional[threading.Event] = None,
                   context: Any = contextlib.nullcontext) -> Iterator[list[int]]:
    """`model.generate` in a thread, as each step's new token ids (one per row). An error there is raised here;
    closing the iterator (or setting `halt`) ends generation at the next step. `context()` wraps the call (an
    adapter switch, for the server)."""
    import torch

    tokens: queue.Queue = queue.Queue()
    halt = halt or threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with context(), torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=mask, streamer=_StepStreamer(tokens),
                               stopping_criteria=[_HaltWhenSet(halt)], **kwargs)
        except BaseException as exc:  # handed to the reading side
            failure.append(exc)
        finally:
            tokens.put(None)

    thread = threading.Thread(target=work, name="martlet-generate", daemon=True)
    thread.start()
    try:
        while True:
            try:
                step = tokens.get(timeout=0.05)  # a short wait keeps Ctrl-C responsive
            except queue.Empty:
                continue
            if step is None:
                break
            yield step
        if failure:
            raise failure[0]
    finally:
        halt.set()
        thread.join()


def _device_of(model: Any):
    import torch

    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


class _StepStreamer:
    """A transformers streamer that hands each step's new token ids (one per row) to a queue; the first call,
    the prompt, is skipped."""

    def __init__(self, tokens: queue.Queue):
        self.tokens = tokens
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _HaltWhenSet:
    """A stopping criterion that ends generation once `event` is set (Ctrl-C, a closed stream, all rows done)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

"""Generation for the server: the replies of `martlet infer`'s TransformersEngine, with the token counts
and the reason each reply ended that the OpenAI API reports.

The engine returns text only, so this module drives the same model with the engine's own settings
(stop words, padding, generation config) and keeps the generated token ids: `completion_tokens` counts
them up to and including the token that ended the reply, and `finish_reason` is "length" when the reply
ran into max_tokens, else "stop". Prompts arrive as token ids (chat prompts rendered by the template).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator, Optional, Sequence

from martlet.infer.engine import generate_steps
from martlet.infer.generation import GenConfig, StreamText, cut_at_stop, whole_text
from martlet.serve.adapters import AdapterGate


@dataclasses.dataclass
class Output:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclasses.dataclass
class Delta:
    """A piece of row `index`'s reply while streaming; `output` is set on the row's last event."""

    index: int
    text: str
    output: Optional[Output] = None


class TransformersBackend:
    """Generates for token-id prompts with a TransformersEngine's model, template and settings."""

    def __init__(self, engine: Any, *, context_length: Optional[int] = None):
        self.engine = engine
        self.template = engine.template
        self.tokenizer = engine.tokenizer
        self.max_batch_size = engine.max_batch_size
        self.gate = AdapterGate(engine.model)
        config = getattr(engine.model, "config", None)
        self.context_length = context_length or getattr(config, "max_position_embeddings", None)
        self.vocab_size = min(len(self.tokenizer), getattr(config, "vocab_size", None) or len(self.tokenizer))

    # prompts ----------------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        return self.template.encode_prompt(messages)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def default_max_tokens(self) -> Optional[int]:
        """max_new_tokens of the model's generation config (None: not set)."""
        return getattr(getattr(self.engine.model, "generation_config", None), "max_new_tokens", None)

    # generation -------------------------------------------------------------------------------------
    def _settings(self, config: GenConfig):
        kwargs, words, stop_ids = self.engine._generate_kwargs(config)
        return kwargs, words, stop_ids, kwargs["generation_config"].max_new_tokens

    def generate(self, prompts: Sequence[list[int]], config: GenConfig, adapter: Optional[str] = None
                 ) -> list[Output]:
        """One Output per prompt, in order, generated in batches of max_batch_size (left padded)."""
        import torch

        outputs: list[Output] = []
        with self.gate.use(adapter):
            for start in range(0, len(prompts), self.max_batch_size):
                chunk = prompts[start: start + self.max_batch_size]
                kwargs, words, stop_ids, max_new = self._settings(config)  # reseeds, as the engine does
                input_ids, mask = self.engine._left_pad(chunk)
                with torch.inference_mode():
                    out = self.engine.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
                width = input_ids.shape[1]
                outputs += [self._finish(out[row, width:].tolist(), words, stop_ids, max_new)
                            for row in range(len(chunk))]
        return outputs

    def _finish(self, ids: list[int], words: Sequence[str], stop_ids: Sequence[int], max_new: int) -> Output:
        stops = set(stop_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        kept = ids[:end] if end is not None else ids
        text, cut = cut_at_stop(whole_text(self.tokenizer, kept), words)
        if end is not None and not cut:
            return Output(text, end + 1, "stop")
        if cut:  # a stop word in the text: count the tokens up to the one that completed it
            return Output(text, self._tokens_to_stop(kept, words), "stop")
        return Output(text, len(ids), "length" if len(ids) >= max_new else "stop")

    def _tokens_to_stop(self, ids: list[int], words: Sequence[str]) -> int:
        low, high = 1, len(ids)  # the smallest prefix whose text holds a stop word (binary search)
        while low < high:
            mid = (low + high) // 2
            if cut_at_stop(self.tokenizer.decode(ids[:mid], skip_special_tokens=False), words)[1]:
                high = mid
            else:
                low = mid + 1
        return low

    def stream(self, prompts: Sequence[list[int]], config: GenConfig, adapter: Optional[str] = None,
               cancel: Optional[threading.Event] = None) -> Iterator[Delta]:
        """Deltas of every row's reply as they are generated (all rows in one batch); each row ends with a
        Delta carrying its Output. Setting `cancel` stops generation."""
        if (config.num_beams or getattr(self.engine.model.generation_config, "num_beams", 1) or 1) > 1:
            for index, output in enumerate(self.generate(prompts, config, adapter)):  # beams cannot stream
                yield Delta(index, output.text, output)
            return
        kwargs, words, stop_ids, max_new = self._settings(config)
        input_ids, mask = self.engine._left_pad(list(prompts))
        texts = [StreamText(self.tokenizer, words, stop_ids) for _ in prompts]
        counts = [0] * len(prompts)
        done = [False] * len(prompts)
        halt = cancel or threading.Event()
        steps = generate_steps(self.engine.model, input_ids, mask, kwargs, halt=halt,
                               context=lambda: self.gate.use(adapter))
        with contextlib.closing(steps):
            for step in steps:
                for row, token in enumerate(step):
                    if done[row]:
                        continue
                    counts[row] += 1
                    text = texts[row]
                    delta = text.add([token])
                    if text.stopped:
                        done[row] = True
                        delta += text.finish()
                        yield Delta(row, delta, Output(text.sent, counts[row], "stop"))
                    elif delta:
                        yield Delta(row, delta)
                if all(done):
                    break  # stop strings were matched in the text: closing ends generation
        for row, text in enumerate(texts):
            if not done[row]:
                reason = "length" if counts[row] >= max_new else "stop"
                yield Delta(row, text.finish(), Output(text.sent, counts[row], reason))

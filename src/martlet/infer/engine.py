"""The transformers engine: load once, generate replies for a batch of prompts, stream them.

`TransformersEngine` is an `Engine` (infer/protocol.py) over a loaded transformers (or peft) model:
prompts are rendered by the Template, left padded into batches and generated together; stop words end
each reply. An adapter gate (infer/adapters.py) picks the LoRA adapter each generation runs with.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any, Iterator, Optional, Sequence

from martlet.infer.adapters import AS_LOADED, AdapterGate
from martlet.infer.generation import GenConfig, StreamText, cut_at_stop, whole_text
from martlet.infer.protocol import Conversation, Delta, Output, Prompt, is_token_ids
from martlet.infer.sampling import install as install_fast_sampling
from martlet.templates.template import Template

logger = logging.getLogger("martlet")


class _Settings:
    """What one generation call runs with: transformers' keyword arguments, the stop words, the stop token ids
    and the reply's token budget."""

    def __init__(self, kwargs: dict[str, Any], words: list[str], stop_ids: list[int]):
        self.kwargs = kwargs
        self.words = words
        self.stop_ids = stop_ids
        self.max_new = kwargs["generation_config"].max_new_tokens


class TransformersEngine:
    """An Engine over a loaded causal LM (plain or peft), its Template and batches of `max_batch_size`."""

    def __init__(self, model: Any, template: Template, *, max_batch_size: int = 16,
                 context_length: Optional[int] = None):
        self.model = model
        self.template = template
        self.tokenizer = template.tokenizer
        self.max_batch_size = max_batch_size
        self.gate = AdapterGate(model)
        config = getattr(model, "config", None)
        self.context_length = context_length or getattr(config, "max_position_embeddings", None)
        self.vocab_size = min(len(self.tokenizer), getattr(config, "vocab_size", None) or len(self.tokenizer))
        install_fast_sampling()  # one token a row on a CPU without torch's multinomial (infer/sampling.py)

    # prompts -------------------------------------------------------------------------------------------
    def encode_chat(self, messages: Conversation) -> list[int]:
        return self.template.encode_prompt(messages)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: ids as they are; a conversation rendered with the generation prompt (its oldest
        tokens cut if too long)."""
        if is_token_ids(prompt):
            return list(prompt)
        ids = self.encode_chat(prompt)
        limit = self.template.max_length
        if limit and len(ids) > limit:
            logger.warning("prompt of %d tokens is longer than max_length=%d: its oldest tokens are dropped.",
                           len(ids), limit)
            ids = ids[-limit:]
        return ids

    def left_pad(self, prompts: Sequence[list[int]]):
        """(input_ids, attention_mask) of `prompts` left padded to one width, on the model's device."""
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

    # settings ------------------------------------------------------------------------------------------
    def model_defaults(self) -> GenConfig:
        return GenConfig.from_any(getattr(self.model, "generation_config", None))

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

    def _settings(self, config: GenConfig) -> _Settings:
        """The generation settings of `config` on the model's own; reseeds when `config.seed` is set."""
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
        return _Settings(kwargs, words, list(hf_config.eos_token_id))

    def _beams(self, config: GenConfig) -> bool:
        return (config.num_beams or getattr(self.model.generation_config, "num_beams", 1) or 1) > 1

    # outputs -------------------------------------------------------------------------------------------
    def _finish(self, ids: list[int], prompt_tokens: int, settings: _Settings) -> Output:
        """The Output of a row's generated ids: cut at the first stop token or stop word."""
        words, stops = settings.words, set(settings.stop_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        kept = ids[:end] if end is not None else ids
        text, cut = cut_at_stop(whole_text(self.tokenizer, kept), words)
        if end is not None and not cut:
            return Output(text, prompt_tokens, end + 1, "stop")
        if cut:  # a stop word in the text: count the tokens up to the one that completed it
            return Output(text, prompt_tokens, self._tokens_to_stop(kept, words), "stop")
        return Output(text, prompt_tokens, len(ids), "length" if len(ids) >= settings.max_new else "stop")

    def _tokens_to_stop(self, ids: list[int], words: Sequence[str]) -> int:
        low, high = 1, len(ids)  # the smallest prefix whose text holds a stop word (binary search)
        while low < high:
            mid = (low + high) // 2
            if cut_at_stop(self.tokenizer.decode(ids[:mid], skip_special_tokens=False), words)[1]:
                high = mid
            else:
                low = mid + 1
        return low

    # the interface -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], config: Optional[GenConfig] = None, *,
                 adapter: Optional[str] = AS_LOADED) -> list[Output]:
        """One Output per prompt, in order; prompts of similar lengths share a batch (less padding)."""
        import torch

        if not prompts:
            return []
        settings = self._settings(config or GenConfig())
        ids = [self.prompt_ids(p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        outputs: list[Optional[Output]] = [None] * len(ids)
        with self.gate.use(adapter):
            for start in range(0, len(order), self.max_batch_size):
                chunk = order[start: start + self.max_batch_size]
                input_ids, mask = self.left_pad([ids[i] for i in chunk])
                with torch.inference_mode():
                    out = self.model.generate(input_ids=input_ids, attention_mask=mask, **settings.kwargs)
                width = input_ids.shape[1]
                for row, index in enumerate(chunk):
                    outputs[index] = self._finish(out[row, width:].tolist(), len(ids[index]), settings)
        return outputs

    def stream(self, prompts: Sequence[Prompt], config: Optional[GenConfig] = None, *,
               adapter: Optional[str] = AS_LOADED, cancel: Optional[threading.Event] = None) -> Iterator[Delta]:
        """Deltas of every prompt's reply (all in one batch); closing the iterator or setting `cancel` stops it.
        Beam search cannot stream: each reply then comes whole."""
        config = config or GenConfig()
        if not prompts:
            return
        if self._beams(config):
            for index, output in enumerate(self.generate(prompts, config, adapter=adapter)):
                yield Delta(index, output.text, output)
            return
        settings = self._settings(config)
        ids = [self.prompt_ids(p) for p in prompts]
        input_ids, mask = self.left_pad(ids)
        rows = [_StreamRow(StreamText(self.tokenizer, settings.words, settings.stop_ids), len(p)) for p in ids]
        steps = generate_steps(self.model, input_ids, mask, settings.kwargs, halt=cancel or threading.Event(),
                               context=lambda: self.gate.use(adapter))
        with contextlib.closing(steps):
            for step in steps:
                for index, token in enumerate(step):
                    delta = rows[index].add(index, token)
                    if delta is not None:
                        yield delta
                if all(row.done for row in rows):
                    break  # stop strings were matched in the text: closing ends generation
        for index, row in enumerate(rows):
            if not row.done:
                yield row.end(index, "length" if row.count >= settings.max_new else "stop")


class _StreamRow:
    """One streamed reply: its text so far, its token count and whether it has ended."""

    def __init__(self, text: StreamText, prompt_tokens: int):
        self.text = text
        self.prompt_tokens = prompt_tokens
        self.count = 0
        self.done = False

    def add(self, index: int, token: int) -> Optional[Delta]:
        """The Delta this token makes (None: nothing to show yet, or the row had ended)."""
        if self.done:
            return None
        self.count += 1
        delta = self.text.add([token])
        if self.text.stopped:
            return self.end(index, "stop", delta)
        return Delta(index, delta) if delta else None

    def end(self, index: int, reason: str, delta: str = "") -> Delta:
        self.done = True
        delta += self.text.finish()
        return Delta(index, delta, Output(self.text.sent, self.prompt_tokens, self.count, reason))


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

"""The spec's Python inference API: `inference` and `inference_stream` on a model and a template.

    model, tokenizer = get_model_tokenizer(model_type, model_kwargs={'device_map': 'auto'})
    model = Swift.from_pretrained(model, ckpt_dir, inference_mode=True)   # a LoRA checkpoint
    template = get_template(template_type, tokenizer)
    response, history = inference(model, template, query)

`history` is a list of [query, response] pairs; the returned one has this turn appended (the one
passed in is not changed). Generation settings (max_new_tokens, do_sample, temperature, top_k, top_p,
repetition_penalty, num_beams, stop_words, seed) are keyword arguments or a `generation_config`.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from martlet.infer.engine import TransformersEngine
from martlet.infer.generation import GenConfig
from martlet.templates.template import Template

History = list  # [[query, response], ...]


def build_messages(query: str, history: Optional[Sequence[Sequence[str]]] = None,
                   system: Optional[str] = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for pair in history or []:
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": query}]


def _engine(model: Any, template: Template) -> TransformersEngine:
    return TransformersEngine(model, template, max_batch_size=1)  # a light wrapper: nothing is loaded


def inference(model: Any, template: Template, query: str, history: Optional[History] = None,
              system: Optional[str] = None, *, generation_config: Any = None, verbose: bool = False,
              **gen: Any) -> tuple[str, History]:
    """(response, history + [[query, response]])."""
    config = GenConfig.from_any(generation_config, **gen)
    messages = build_messages(query, history, system)
    response = _engine(model, template).generate([messages], config)[0].text
    if verbose:
        print(f"[QUERY] {query}\n[RESPONSE] {response}", flush=True)
    return response, [list(pair) for pair in history or []] + [[query, response]]


def inference_stream(model: Any, template: Template, query: str, history: Optional[History] = None,
                     system: Optional[str] = None, *, generation_config: Any = None,
                     **gen: Any) -> Iterator[tuple[str, History]]:
    """Yields (response so far, history with this turn so far) as the reply is generated."""
    config = GenConfig.from_any(generation_config, **gen)
    messages = build_messages(query, history, system)
    before = [list(pair) for pair in history or []]
    response = ""
    for delta in _engine(model, template).stream([messages], config):
        if delta.text:
            response += delta.text
            yield response, before + [[query, response]]

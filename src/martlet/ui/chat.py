"""The chat page of `martlet app-ui`: a gradio Blocks app over an Engine.

Streamed, multi-turn replies; a system prompt; max new tokens, temperature and top-p; Clear and Stop.
The conversation lives in the page (a gr.State of plain messages), so every browser tab has its own.
`reply_stream` holds the logic and needs no gradio, so it is tested on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

from martlet.infer.generation import GenConfig
from martlet.infer.protocol import Engine

DEFAULT_UI_MAX_NEW_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the settings panel holds, with the values it starts from."""

    system: str
    max_new_tokens: int
    temperature: float
    top_p: float

    @classmethod
    def initial(cls, engine: Engine, defaults: GenConfig) -> "Settings":
        """The server's --arguments first, else the model's generation config (greedy when it does not sample)."""
        own = engine.model_defaults()
        samples = defaults.do_sample if defaults.do_sample is not None else bool(own.do_sample)
        temperature = defaults.temperature
        if temperature is None:
            temperature = (own.temperature or 1.0) if samples else 0.0
        top_p = defaults.top_p or own.top_p or 1.0
        return cls(engine.template.system or "", defaults.max_new_tokens or DEFAULT_UI_MAX_NEW_TOKENS,
                   float(temperature), float(top_p))


def reply_stream(engine: Engine, history: list[dict], message: str, settings: Settings,
                 defaults: Optional[GenConfig] = None) -> Iterator[str]:
    """The reply to `message` after `history` (plain {role, content} turns), growing as it is generated.

    An empty system prompt leaves the template's own default in place."""
    head = [{"role": "system", "content": settings.system}] if settings.system.strip() else []
    messages = head + list(history) + [{"role": "user", "content": message}]
    config = dataclasses.replace(defaults or GenConfig(), max_new_tokens=int(settings.max_new_tokens),
                                 temperature=float(settings.temperature), do_sample=settings.temperature > 0,
                                 top_p=float(settings.top_p))
    reply = ""
    with contextlib.closing(engine.stream([messages], config)) as deltas:  # closing it stops generation
        for delta in deltas:
            if delta.text:
                reply += delta.text
                yield reply


def build_chat_ui(engine: Engine, defaults: Optional[GenConfig] = None, *, title: str = "Martlet chat"):
    """The gradio Blocks of the chat page (not launched)."""
    import gradio as gr

    defaults = defaults or GenConfig()
    start = Settings.initial(engine, defaults)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}")
        history = gr.State([])
        chatbot = gr.Chatbot(label="Chat", elem_id="martlet-chatbot", height=480)
        with gr.Row():
            box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8,
                             elem_id="martlet-input", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="martlet-send")
        with gr.Row():
            stop = gr.Button("Stop", elem_id="martlet-stop")
            clear = gr.Button("Clear", elem_id="martlet-clear")
        with gr.Accordion("Settings", open=False, elem_id="martlet-settings"):
            system = gr.Textbox(start.system, label="System prompt (empty: the template's default)", lines=2,
                                elem_id="martlet-system")
            max_new = gr.Slider(1, max(4096, start.max_new_tokens), value=start.max_new_tokens, step=1,
                                label="Max new tokens", elem_id="martlet-max-new-tokens")
            temperature = gr.Slider(0, 2, value=start.temperature, step=0.05, label="Temperature (0: greedy)",
                                    elem_id="martlet-temperature")
            top_p = gr.Slider(0.05, 1, value=start.top_p, step=0.05, label="Top-p", elem_id="martlet-top-p")

        def respond(message, turns, system_, max_new_, temperature_, top_p_):
            if not message or not message.strip():
                yield "", turns, turns
                return
            settings = Settings(system_ or "", int(max_new_), float(temperature_), float(top_p_))
            shown = turns + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
            yield "", shown, turns
            for reply in reply_stream(engine, turns, message, settings, defaults):
                shown[-1] = {"role": "assistant", "content": reply}
                yield "", shown, turns
            yield "", shown, shown  # the turn is part of the history once it is complete

        inputs = [box, history, system, max_new, temperature, top_p]
        events = [trigger(respond, inputs, [box, chatbot, history]) for trigger in (box.submit, send.click)]
        stop.click(None, cancels=events)
        clear.click(lambda: ([], [], ""), None, [chatbot, history, box], cancels=events)
        chatbot.clear(lambda: [], None, [history], cancels=events)  # the chat's own trash icon
    return demo

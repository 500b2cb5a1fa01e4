"""`martlet app-ui` / `app_ui_main(infer_args)`: a chat page in the browser for a model or checkpoint.

parse -> validate -> (merge) -> plan -> load the engine -> build the gradio page -> serve it on
127.0.0.1 (by default) until Ctrl-C. `app_ui_main` takes the InferArguments of the spec's example as
they are (the page then uses its default address and port) or AppUIArguments.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

from martlet.args.base import parse_cli, to_dict
from martlet.args.infer import InferArguments
from martlet.args.serve import AppUIArguments
from martlet.errors import MartletError
from martlet.infer.checkpoint import plan_inference
from martlet.infer.generation import GenConfig
from martlet.infer.load import load_engine
from martlet.infer.merge import merge_lora
from martlet.serve.main import served_name
from martlet.ui.chat import build_chat_ui
from martlet.utils import setup_logging

logger = logging.getLogger("martlet")


def _arguments(args: AppUIArguments | InferArguments | Sequence[str] | None) -> AppUIArguments:
    if isinstance(args, AppUIArguments):
        return args
    if isinstance(args, InferArguments):
        return AppUIArguments(**to_dict(args))
    return parse_cli(AppUIArguments, args)


def launch_app_ui(args: AppUIArguments | InferArguments | Sequence[str] | None, *, block: bool = True):
    """Load the model and serve the page; returns the launched gradio app (at once when block=False)."""
    setup_logging()
    args = _arguments(args).validate()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local chat page
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise MartletError("the chat page needs gradio.", hint="pip install 'martlet[ui]'") from None
    from transformers import set_seed

    set_seed(args.seed)
    if args.merge_lora:
        args = dataclasses.replace(args, ckpt_dir=merge_lora(args), merge_lora=False)
    plan = plan_inference(args)
    engine = load_engine(args, plan)
    demo = build_chat_ui(engine, GenConfig.from_args(args), title=args.title or served_name(plan))
    demo.queue(default_concurrency_limit=1)  # one reply at a time: they would share the CPU/GPU anyway
    return serve_page(demo, args.server_name, args.server_port, block=block, share=args.share,
                      message="chat page at %s (Ctrl-C stops it)")


def serve_page(demo: Any, server_name: str, server_port: int, *, block: bool, share: bool = False,
               message: str = "page at %s") -> Any:
    """Launch a gradio page; a port in use is a one-line error. `block` serves until Ctrl-C."""
    try:
        demo.launch(server_name=server_name, server_port=server_port, share=share, prevent_thread_lock=True,
                    inbrowser=False, quiet=True)
    except OSError as exc:  # gradio says "Cannot find empty port" / the port is in use
        raise MartletError(f"cannot serve the page: {exc}", field="server_port",
                           hint="Pick another --server_port.") from None
    logger.info(message, demo.local_url)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo


def app_ui_main(args: AppUIArguments | InferArguments | Sequence[str] | None = None) -> None:
    """Serve the chat page until Ctrl-C."""
    launch_app_ui(args, block=True)


def main(argv: Sequence[str] | None = None) -> int:
    app_ui_main(argv)
    return 0

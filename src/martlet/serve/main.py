"""`martlet deploy` / `deploy_main`: read top to bottom.

parse -> validate -> (merge) -> plan -> load the engine (+ the --lora_modules adapters) -> create_app ->
listen (uvicorn) until SIGTERM or Ctrl-C, which finish the requests in flight before exiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import threading
from typing import Optional, Sequence

import uvicorn
from fastapi import FastAPI

from martlet.args.base import parse_cli
from martlet.args.serve import DeployArguments, is_loopback
from martlet.errors import MartletError
from martlet.infer.adapters import attach_adapters
from martlet.infer.checkpoint import InferPlan, plan_inference
from martlet.infer.engine import TransformersEngine
from martlet.infer.generation import GenConfig
from martlet.infer.load import load_engine
from martlet.infer.merge import merge_lora
from martlet.models.embedded import EMBEDDED_MODEL_TYPE
from martlet.serve.app import ServedModel, create_app
from martlet.train.packed import pack_for_inference
from martlet.utils import setup_logging

logger = logging.getLogger("martlet")


def deploy_main(args: DeployArguments | Sequence[str] | None = None) -> None:
    """Serve until stopped (SIGTERM, Ctrl-C)."""
    setup_logging()
    if not isinstance(args, DeployArguments):
        args = parse_cli(DeployArguments, args)
    args.validate()
    sock = bind(args.host, args.port)  # before anything slow: a port in use fails fast
    from transformers import set_seed

    set_seed(args.seed)
    if args.merge_lora:
        args = dataclasses.replace(args, ckpt_dir=merge_lora(args), merge_lora=False)
    app = create_deploy_app(args)
    if not is_loopback(args.host) and args.api_key is None:
        logger.warning("listening on %s without --api_key: anyone who reaches this machine can use the model.",
                       args.host)
    serve(app, sock, shutdown_timeout=args.shutdown_timeout, access_log=args.access_log)


def create_deploy_app(args: DeployArguments, plan: Optional[InferPlan] = None):
    """The app for these arguments: the model of --ckpt_dir / --model_id_or_path plus --lora_modules."""
    plan = plan or plan_inference(args)
    engine = load_engine(args, plan)
    pairs = args.lora_pairs()
    if pairs:
        internal = [(f"lora_{i}", path) for i, (_, path) in enumerate(pairs)]  # never "default" (--ckpt_dir's)
        model = attach_adapters(engine.model, internal)
        pack_for_inference(model)  # (the layers the adapters now wrap give their packed copies back)
        engine = TransformersEngine(model, engine.template, max_batch_size=args.max_batch_size,
                                    context_length=args.max_model_len)
    defaults = GenConfig.from_args(args)
    primary = ServedModel(args.served_model_name or served_name(plan), engine,
                          "default" if plan.adapter_dir else None, defaults)
    models = [primary] + [ServedModel(name, engine, f"lora_{i}", defaults) for i, (name, _) in enumerate(pairs)]
    logger.info("serving: %s", ", ".join(m.name for m in models))
    return create_app(models, api_key=args.api_key, max_body_bytes=args.max_body_bytes)


def served_name(plan: InferPlan) -> str:
    """The default model name: the model type, else the checkpoint's or model folder's name."""
    if plan.model_type:
        return plan.model_type
    path = (plan.checkpoint.path if plan.checkpoint else None) or plan.model_id_or_path
    if path:
        return os.path.basename(os.path.normpath(path))
    return EMBEDDED_MODEL_TYPE


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "Pick another --port (0: any free one)." if exc.errno == errno.EADDRINUSE else None
        raise MartletError(f"cannot listen on {host}:{port}: {exc.strerror}.", field="port", hint=hint) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, sock: socket.socket, *, shutdown_timeout: int = 30, access_log: bool = False) -> None:
    """Run `app` on `sock` until SIGTERM or Ctrl-C (uvicorn finishes the requests in flight, then the app
    finishes its queued batches)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    server = _server(config)
    logger.info("OpenAI-compatible API at http://%s:%d/v1 (Ctrl-C or SIGTERM stops it)", shown, port)
    server.run(sockets=[sock])
    logger.info("server stopped.")


def _server(config: uvicorn.Config) -> uvicorn.Server:
    """A uvicorn Server whose graceful stop is a normal exit.

    uvicorn (0.54) re-raises the signal it caught once it has shut down gracefully, so the process dies of
    SIGTERM (status -15) before it can say so. This subclass restores the previous handlers and returns."""
    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)


def main(argv: Sequence[str] | None = None) -> int:
    deploy_main(argv)
    return 0

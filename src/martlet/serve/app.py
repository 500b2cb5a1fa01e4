"""The OpenAI-compatible HTTP app: `create_app(models)` returns a FastAPI app; nothing is global.

The app speaks HTTP only: it turns a request into prompts and a GenConfig for an Engine
(infer/protocol.py) and the engine's Outputs and Deltas into OpenAI responses.

    GET  /health                 200 once the app is up (no key needed)
    GET  /v1/models              the served models (the base or checkpoint, and each --lora_modules name)
    POST /v1/chat/completions    chat, streamed (SSE, ending `data: [DONE]`) or not
    POST /v1/completions         plain text completion, streamed or not

Non-streamed requests go through a Batcher (requests that arrive together are generated together);
streamed ones run as they come. Every failure reaches the client in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
from typing import Any, AsyncIterator, Callable, Optional, Sequence, Union

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from martlet.errors import MartletError
from martlet.infer.adapters import AS_LOADED
from martlet.infer.generation import DEFAULT_MAX_NEW_TOKENS, GenConfig
from martlet.infer.protocol import Delta, Engine, Output
from martlet.serve import protocol as P
from martlet.serve.batching import Batcher, Job
from martlet.serve.errors import APIError, bad_request, install_error_handlers

logger = logging.getLogger("martlet")
Req = Union[P.ChatCompletionRequest, P.CompletionRequest]
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024


@dataclasses.dataclass
class ServedModel:
    """A name clients ask for: an engine (the loaded model), and which adapter of it (None: the base model)."""

    name: str
    engine: Engine
    adapter: Optional[str] = AS_LOADED
    defaults: GenConfig = dataclasses.field(default_factory=GenConfig)  # the server's generation settings
    created: int = dataclasses.field(default_factory=P.now)


def as_served_models(models: Union[ServedModel, Engine, Sequence[Any]], name: str = "default"
                     ) -> list[ServedModel]:
    """ServedModels from a ServedModel, a list of them, or an engine (served as `name`)."""
    if isinstance(models, ServedModel):
        return [models]
    if isinstance(models, (list, tuple)):
        return [m for item in models for m in as_served_models(item, name)]
    return [ServedModel(name, models)]


def create_app(models: Union[ServedModel, Engine, Sequence[Any]], *, api_key: Optional[str] = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, batch_window_s: float = 0.005,
               served_model_name: str = "default"):
    """The FastAPI app serving `models` (see as_served_models); `api_key` makes every /v1 call need it."""
    served = as_served_models(models, served_model_name)
    by_name = {m.name: m for m in served}
    if len(by_name) != len(served):
        raise MartletError("two served models have the same name.", field="served_model_name")
    app = FastAPI(title="martlet", lifespan=_lifespan(served, batch_window_s), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.models = served
    install_error_handlers(app)
    authorize = _authorizer(api_key)

    def lookup(name: str) -> ServedModel:
        if name not in by_name:
            raise APIError(404, f"The model '{name}' does not exist. Served: {', '.join(by_name)}.", param="model",
                           code="model_not_found")
        return by_name[name]

    _add_model_routes(app, served, lookup, authorize)
    _add_completion_routes(app, lookup, authorize, max_body_bytes)
    return app


def _lifespan(served: list[ServedModel], batch_window_s: float):
    """A Batcher per engine while the app runs; at shutdown each finishes what is queued."""
    engines = list({id(m.engine): m.engine for m in served}.values())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.batchers = {id(e): Batcher(_batch_generate(e), max_rows=e.max_batch_size, window_s=batch_window_s)
                              for e in engines}
        yield
        for batcher in app.state.batchers.values():  # requests in flight are done: finish what is queued
            await asyncio.to_thread(batcher.close)

    return lifespan


def _batch_generate(engine: Engine) -> Callable[[Sequence[list], GenConfig, Optional[str]], list[Output]]:
    def generate(rows: Sequence[list], config: GenConfig, adapter: Optional[str]) -> list[Output]:
        return engine.generate(rows, config, adapter=adapter)

    return generate


def _authorizer(api_key: Optional[str]):
    """The dependency that checks the bearer key of a /v1 call (none needed without `api_key`)."""

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    return authorize


def _add_model_routes(app: FastAPI, served: list[ServedModel], lookup: Callable[[str], ServedModel],
                      authorize: Any) -> None:
    names = [m.name for m in served]

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": names}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        return {"object": "list", "data": [P.model_card(m.name, m.created, served[0].name) for m in served]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def get_model(name: str):
        model = lookup(name)
        return P.model_card(model.name, model.created, served[0].name)


def _add_completion_routes(app: FastAPI, lookup: Callable[[str], ServedModel], authorize: Any,
                           max_body_bytes: int) -> None:
    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        req = P.parse_body(P.ChatCompletionRequest, await _read_body(request, max_body_bytes))
        model = lookup(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        prompt = await asyncio.to_thread(_encode, model.engine.encode_chat, messages, "messages")
        config, rows = _plan(model, req, [prompt], "messages")
        if req.stream:
            events = _chat_events(model, req, rows, config, len(prompt))
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        outputs = await _generate(request.app, model, req, rows, config)
        return P.chat_completion(P.new_id("chatcmpl"), model.name, outputs, len(prompt))

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        req = P.parse_body(P.CompletionRequest, await _read_body(request, max_body_bytes))
        model = lookup(req.model)
        prompts = [await asyncio.to_thread(_encode, model.engine.encode_text, p, "prompt") if isinstance(p, str)
                   else _check_ids(p, model.engine.vocab_size) for p in req.prompts()]
        config, rows = _plan(model, req, prompts, "prompt")
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            events = _text_events(model, req, rows, config, prompt_tokens)
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        outputs = await _generate(request.app, model, req, rows, config)
        return P.text_completion(P.new_id("cmpl"), model.name, outputs, prompt_tokens)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# the request, checked ---------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to pass `limit` bytes."""
    length = request.headers.get("content-length", "")
    too_large = APIError(413, f"The request body is larger than the limit of {limit} bytes.",
                         code="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _encode(encode: Callable[[Any], list[int]], value: Any, param: str) -> list[int]:
    try:
        return encode(value)
    except MartletError as exc:  # e.g. a template that refuses this order of roles
        raise bad_request(exc.message, param) from None


def _check_ids(ids: list[int], vocab_size: int) -> list[int]:
    if any(not 0 <= t < vocab_size for t in ids):
        raise bad_request(f"token ids must be in [0, {vocab_size}).", "prompt")
    return ids


def _plan(model: ServedModel, req: Req, prompts: list[list[int]], param: str) -> tuple[GenConfig, list[list[int]]]:
    """The request's generation settings and its rows (each prompt n times), within the model's limits."""
    engine = model.engine
    context, limit = engine.context_length, engine.template.max_length
    longest = max(len(p) for p in prompts)
    if (limit and longest > limit) or (context and longest >= context):
        bound = min(x for x in (limit, context - 1 if context else None) if x)
        raise APIError(413, f"The prompt has {longest} tokens; this server takes at most {bound}.", param=param,
                       code="context_length_exceeded")
    if len(prompts) * req.n > P.MAX_N:
        raise bad_request(f"prompts times n may be at most {P.MAX_N}.", "n")
    room = context - longest if context else None
    wanted = req.wanted_tokens()
    if wanted and room is not None and wanted > room:
        raise bad_request(f"max_tokens={wanted} does not fit: the prompt has {longest} tokens and the context "
                          f"{context}; ask for at most {room}.", "max_tokens", "context_length_exceeded")
    default = model.defaults.max_new_tokens or engine.model_defaults().max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    overrides = {"max_new_tokens": wanted or (min(default, room) if room else default), "seed": req.seed,
                 "top_p": req.top_p, "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
                 "stop_words": list(dict.fromkeys([*model.defaults.stop_words, *req.stop_words()]))}
    if req.temperature is not None:
        sample = req.temperature >= P.GREEDY_BELOW
        overrides.update(temperature=req.temperature if sample else 0.0, do_sample=sample)
    config = dataclasses.replace(model.defaults, **{k: v for k, v in overrides.items() if v is not None})
    return config, [p for p in prompts for _ in range(req.n)]


# generation -------------------------------------------------------------------------------------------
async def _generate(app: FastAPI, model: ServedModel, req: Req, rows: list, config: GenConfig) -> list[Output]:
    key = (model.adapter, repr(config)) if req.seed is None else object()  # a seeded request runs alone
    job = Job(key, rows, config, model.adapter)
    try:
        future = app.state.batchers[id(model.engine)].submit(job)
    except RuntimeError:
        raise APIError(503, "The server is shutting down.", code="shutting_down") from None
    return await asyncio.wrap_future(future)


async def _stream(model: ServedModel, rows: list, config: GenConfig) -> AsyncIterator[Delta]:
    """The engine's stream of Deltas, produced in a thread; leaving early stops generation."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    end = object()

    def hand(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody listens
            loop.call_soon_threadsafe(events.put_nowait, item)

    def produce() -> None:
        try:
            for delta in model.engine.stream(rows, config, adapter=model.adapter, cancel=cancel):
                hand(delta)
        except BaseException as exc:
            hand(exc)
        finally:
            hand(end)

    threading.Thread(target=produce, name="martlet-serve-sse", daemon=True).start()
    try:
        while (item := await events.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(model: ServedModel, req: Req, rows: list, config: GenConfig, prompt_tokens: int, rid: str,
                  chunk: Any, piece: Any, first: Optional[Any]) -> AsyncIterator[str]:
    """SSE lines for a stream: chunks built by `chunk(choices)`, one per delta, then usage and [DONE]."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    created = P.now()

    def line(choices: list, usage: Optional[dict] = None) -> str:
        return _sse(chunk(rid, model.name, created, choices, usage, include_usage))

    completion_tokens = 0
    try:
        if first is not None:
            yield line([first(i) for i in range(len(rows))])
        async for delta in _stream(model, rows, config):
            if delta.text:
                yield line([piece(delta.index, delta.text, None)])
            if delta.output is not None:
                completion_tokens += delta.output.completion_tokens
                yield line([piece(delta.index, None, delta.output.finish_reason)])
        if include_usage:
            yield line([], P.usage(prompt_tokens, completion_tokens))
    except Exception as exc:  # headers are sent: the error goes into the stream, as OpenAI does
        logger.exception("stream of %s failed", rid)
        yield _sse(APIError(500, f"Generation failed: {type(exc).__name__}: {exc}", code="internal_error").body())
    yield "data: [DONE]\n\n"


def _chat_events(model: ServedModel, req: Req, rows: list, config: GenConfig, prompt_tokens: int):
    def first(index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def piece(index: int, text: Optional[str], finish: Optional[str]) -> dict:
        return {"index": index, "delta": {"content": text} if text is not None else {}, "logprobs": None,
                "finish_reason": finish}

    return _events(model, req, rows, config, prompt_tokens, P.new_id("chatcmpl"), P.chat_chunk, piece, first)


def _text_events(model: ServedModel, req: Req, rows: list, config: GenConfig, prompt_tokens: int):
    def piece(index: int, text: Optional[str], finish: Optional[str]) -> dict:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    return _events(model, req, rows, config, prompt_tokens, P.new_id("cmpl"), P.text_chunk, piece, None)

"""The OpenAI request bodies this server accepts, checked strictly, and the response objects it returns.

A body is validated as JSON in one step (pydantic, strict types): malformed JSON, a wrong type, a value
out of range or an argument OpenAI does not define is a 400 naming the parameter. Arguments that OpenAI
defines but this server cannot honour (logprobs, tools, penalties) are refused, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from martlet.serve.errors import APIError, bad_request

MAX_N = 64  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # longer stop strings cost seconds to prepare (transformers' StopStringCriteria)
GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding (dividing logits by it overflows)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What chat and text completions share."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)  # what torch.manual_seed takes
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    # extensions (as vLLM accepts them): sent by the openai client through `extra_body`
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=100)  # beyond: sampling meets inf logits

    def stop_words(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_supported(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by this server; leave it out or set it to 0.", name,
                                  "unsupported_parameter")
        stops = self.stop_words()
        if len(stops) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise bad_request(f"stop takes at most {MAX_STOP} non-empty strings of up to {MAX_STOP_CHARS} "
                              "characters.", "stop")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None

    def wanted_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise bad_request("logprobs is not supported by this server.", "logprobs", "unsupported_parameter")
        if self.messages[-1].role != "user":
            raise bad_request("the last message must have the role 'user'.", f"messages.{len(self.messages) - 1}.role")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None

    def wanted_tokens(self) -> Optional[int]:
        return self.max_tokens

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts: texts, or lists of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        super().check_supported()
        if not self.prompts() or any(len(p) == 0 for p in self.prompts()):
            raise bad_request("prompt must not be empty.", "prompt")
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by this server.", name, "unsupported_parameter")
        if self.best_of not in (None, self.n):
            raise bad_request("best_of is not supported by this server (it may only equal n).", "best_of",
                              "unsupported_parameter")


def parse_body(cls: type[_Sampling], body: bytes) -> Any:
    """A checked request of type `cls` from the raw body, or an APIError (400) naming what is wrong."""
    try:
        request = cls.model_validate_json(body)
    except ValidationError as exc:
        raise _as_api_error(exc) from None
    request.check_supported()
    return request


def _as_api_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"The body is not valid JSON: {first['msg']}.", None, "invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return bad_request("The body must be a JSON object.", None, "invalid_json")
    # a value no alternative of a union accepts fails once per alternative: the deepest failure is the one the
    # client meant (it sent an array and an item is wrong); several at one depth mean the value's type is wrong
    deepest = max(len(_path(e)) for e in errors)
    tied = [e for e in errors if len(_path(e)) == deepest]
    first = tied[0]
    param = ".".join(_path(first)) or None
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    expected = list(dict.fromkeys(_TYPE_ERRORS.get(e["type"], "") for e in tied))
    if all(expected):
        wanted = ", ".join(expected[:-1]) + (" or " if len(expected) > 1 else "") + expected[-1]
        return bad_request(f"Invalid type for '{param}': expected {wanted}, but got {_json_type(first['input'])} "
                           "instead.", param)
    return bad_request(f"Invalid value for '{param}': {first['msg']}.", param)


# pydantic's error type for a value of the wrong JSON type -> what the parameter takes
_TYPE_ERRORS = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
                "bool_type": "a boolean", "list_type": "an array", "model_type": "an object", "dict_type": "an object"}


def _field_names(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for sub in model.__subclasses__():
        names |= _field_names(sub)
    return names


_FIELDS = _field_names(_Strict)


def _path(error: dict[str, Any]) -> list[str]:
    """The parameter as the client wrote it (`messages.0.content`): pydantic adds to an error's location the
    union alternative it tried ('str', 'list[TextPart]'), which is no field of a request (an unknown argument,
    last in its location, is kept)."""
    loc = error["loc"]
    *steps, last = loc or ("",)
    path = [str(step) for step in steps if not isinstance(step, str) or step in _FIELDS]
    if error["type"] == "extra_forbidden" or not isinstance(last, str) or last in _FIELDS:
        path.append(str(last))
    return [step for step in path if step]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"),
                       (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


# responses ------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, outputs: list, prompt_tokens: int) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                "finish_reason": o.finish_reason} for i, o in enumerate(outputs)]
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, sum(o.completion_tokens for o in outputs)), "system_fingerprint": None}


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: Optional[dict] = None,
               with_usage: bool = False) -> dict[str, Any]:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
             "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def text_completion(rid: str, model: str, outputs: list, prompt_tokens: int) -> dict[str, Any]:
    choices = [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
               for i, o in enumerate(outputs)]
    return {"id": rid, "object": "text_completion", "created": now(), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, sum(o.completion_tokens for o in outputs)), "system_fingerprint": None}


def text_chunk(rid: str, model: str, created: int, choices: list[dict], usage_: Optional[dict] = None,
               with_usage: bool = False) -> dict[str, Any]:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
             "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def model_card(name: str, created: int, root: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "martlet", "root": root}

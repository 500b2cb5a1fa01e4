"""A refused request names the parameter as the client wrote it, never pydantic's union alternative
('messages.0.content.str'), and says what type it takes (issue #25, item 9f)."""

import json

import pytest

pytest.importorskip("fastapi")

from martlet.serve.errors import APIError  # noqa: E402
from martlet.serve.protocol import ChatCompletionRequest, CompletionRequest, parse_body  # noqa: E402


def chat_message(**fields):
    return {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", **fields}]}


@pytest.mark.parametrize("cls, body, param, words", [
    (ChatCompletionRequest, chat_message(content=None), "messages.1.content",
     "expected a string or an array, but got null"),
    (ChatCompletionRequest, chat_message(content=5), "messages.1.content",
     "expected a string or an array, but got a number"),
    (ChatCompletionRequest, chat_message(content={"text": "hi"}), "messages.1.content", "but got an object"),
    (ChatCompletionRequest, chat_message(content=[{"type": "image_url", "text": "x"}]), "messages.1.content.0.type",
     "Input should be 'text'"),
    (ChatCompletionRequest, chat_message(content=[{"type": "text"}]), "messages.1.content.0.text", "Missing"),
    (ChatCompletionRequest, chat_message(content=[{"type": "text", "text": "x", "cache": 1}]),
     "messages.1.content.0.cache", "Unrecognized"),
    (ChatCompletionRequest, {**chat_message(content="x"), "stop": 5}, "stop", "expected a string or an array"),
    (ChatCompletionRequest, {"model": "m", "messages": [5]}, "messages.0", "expected an object, but got a number"),
    (CompletionRequest, {"model": "m", "prompt": None}, "prompt", "expected a string or an array, but got null"),
    (CompletionRequest, {"model": "m", "prompt": [1.5]}, "prompt.0", "but got a number"),
])
def test_the_parameter_is_named_as_the_client_wrote_it(cls, body, param, words):
    with pytest.raises(APIError) as info:
        parse_body(cls, json.dumps(body).encode())
    error = info.value.body()["error"]
    assert info.value.status == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert f"'{param}'" in error["message"] or param in error["message"]
    assert words in error["message"], error["message"]
    assert ".str" not in error["message"] and "list[" not in error["message"]

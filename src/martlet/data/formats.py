"""Dataset row formats -> one canonical form: {"messages": [{"role", "content"}, ...]} or {"text": ...}.

Detected per row: OpenAI messages, sharegpt conversations, alpaca (instruction/input/output),
query/response (with history), and plain text (for `martlet pt`).

In every format an assistant reply must say something (an empty one would teach the model to answer with
nothing). Training rows (`needs_reply`) must also end with the assistant's reply: a trailing user turn has
nothing to learn from. Prompts for inference end with the user turn, so there it is the normal shape.
"""

from __future__ import annotations

from typing import Any, Callable

from martlet.errors import MartletError

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")


class RowError(MartletError):
    """A bad row; the loader fills in file and line."""


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise RowError("is missing or empty.", field=key)
        return None
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise RowError(f"must be a string, got {type(value).__name__}.", field=key)
    return value


def _history(row: dict[str, Any], key: str = "history") -> list[dict[str, str]]:
    history = row.get(key) or []
    if not isinstance(history, list):
        raise RowError("must be a list of [query, response] pairs.", field=key)
    messages: list[dict[str, str]] = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowError(f"item {i} must be a [query, response] pair of strings.", field=key)
        if not pair[1].strip():
            raise RowError(f"item {i} has an empty response.", field=key)
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def _with_system(row: dict[str, Any], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    system = _text(row, "system", required=False)
    return ([{"role": "system", "content": system}] if system else []) + messages


def check_replies(messages: list[dict[str, str]], field: str, *, needs_reply: bool = False) -> None:
    """RowError (naming `field`) at the first empty assistant reply, or, with `needs_reply`, when the
    conversation does not end with the assistant's reply."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError(f"item {i} is an empty assistant reply.", field=field,
                           hint="Write the reply, or drop the turn.")
    if needs_reply and messages and messages[-1]["role"] != "assistant":
        raise RowError(f"ends with a {messages[-1]['role']} turn that has no reply; a training row must end "
                       "with the assistant's reply.", field=field,
                       hint="Add the reply, or drop the last turn.")


def from_messages(row: dict[str, Any]) -> dict[str, Any]:
    raw = row["messages"]
    if not isinstance(raw, list) or not raw:
        raise RowError("must be a non-empty list of {role, content} objects.", field="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError(f"item {i} must be an object with role and content.", field="messages")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise RowError(f"item {i} has role {role!r}; expected one of {', '.join(_ROLES)}.", field="messages")
        if not isinstance(content, str):
            raise RowError(f"item {i} needs a string content.", field="messages")
        messages.append({"role": role, "content": content})
    check_replies(messages, "messages")
    return {"messages": _with_system(row, messages) if messages[0]["role"] != "system" else messages}


def from_sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    raw = row["conversations"]
    if not isinstance(raw, list) or not raw:
        raise RowError("must be a non-empty list of {from, value} objects.", field="conversations")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise RowError(f"item {i} must be an object with from and value.", field="conversations")
        speaker = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = _SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise RowError(f"item {i} has from={speaker!r}; expected human, gpt or system.", field="conversations")
        if not isinstance(value, str):
            raise RowError(f"item {i} needs a string value.", field="conversations")
        messages.append({"role": role, "content": value})
    check_replies(messages, "conversations")
    return {"messages": _with_system(row, messages) if messages[0]["role"] != "system" else messages}


def from_alpaca(row: dict[str, Any]) -> dict[str, Any]:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    query = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    return {"messages": _with_system(row, _history(row) + _exchange(row, query, "output"))}


def _exchange(row: dict[str, Any], query: str, reply_key: str) -> list[dict[str, str]]:
    """The user's turn and the reply under `reply_key`; a row without that key is a prompt alone (GRPO and
    inference read those; a training row is refused where to_canonical checks for the reply)."""
    turns = [{"role": "user", "content": query}]
    if reply_key in row:
        turns.append({"role": "assistant", "content": _text(row, reply_key)})
    return turns


def from_query_response(row: dict[str, Any]) -> dict[str, Any]:
    if "query" not in row:
        raise RowError("is missing: a query/response row needs the user's query.", field="query")
    return {"messages": _with_system(row, _history(row) + _exchange(row, _text(row, "query"), "response"))}


def from_text(row: dict[str, Any]) -> dict[str, Any]:
    return {"text": _text(row, "text")}


# (keys that identify the format, converter), first match wins
FORMATS: list[tuple[str, tuple[str, ...], Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("messages", ("messages",), from_messages),
    ("sharegpt", ("conversations",), from_sharegpt),
    ("alpaca", ("instruction",), from_alpaca),
    ("query-response", ("query",), from_query_response),
    ("query-response", ("response",), from_query_response),
    ("text", ("text",), from_text),
]


_REPLY_FIELD = {"query": "response", "instruction": "output"}  # where a row of these formats keeps its reply


def to_canonical(row: Any, *, needs_reply: bool = False) -> dict[str, Any]:
    """The canonical form of one row, or RowError naming the field. `needs_reply` (training rows): a
    conversation must end with the assistant's reply."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}.")
    for _, keys, convert in FORMATS:
        if all(k in row for k in keys):
            reply = _REPLY_FIELD.get(keys[0])
            if needs_reply and reply and reply not in row:
                raise RowError("is missing: a training row needs the assistant's reply.", field=reply)
            canonical = convert(row)
            if needs_reply and "messages" in canonical:
                check_replies(canonical["messages"], _REPLY_FIELD.get(keys[0], keys[0]), needs_reply=True)
            return canonical
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise RowError(f"unknown row format (keys: {keys}); expected messages, conversations (sharegpt), "
                   "instruction/output (alpaca), query/response, or text.")

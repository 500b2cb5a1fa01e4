"""Property test: hostile dataset files end in a MartletError naming file and line, never a traceback."""

import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from martlet.data.sources import read_file
from martlet.errors import MartletError

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)
KEYS = ["messages", "conversations", "instruction", "input", "output", "query", "response", "history", "system",
        "text", "role", "content", "from", "value"]
rows = st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=5),
                 st.fixed_dictionaries({"query": st.text(max_size=5000), "response": st.text(max_size=50)}),
                 st.fixed_dictionaries({"messages": st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                                                             values), max_size=4)}))


def line_of(row) -> bytes:
    return json.dumps(row, allow_nan=True).encode("utf-8")


files = st.one_of(
    st.lists(rows, max_size=8).map(lambda rs: b"\n".join(line_of(r) for r in rs)),
    st.binary(max_size=300),
    st.lists(st.one_of(rows.map(line_of), st.binary(max_size=40)), max_size=6).map(b"\n".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=files, ext=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_hostile_files(content, ext):
    fd, path = tempfile.mkstemp(suffix=ext)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    try:
        loaded = read_file(path)
    except MartletError as exc:
        assert exc.file == path
        assert exc.line is not None or "empty" in exc.message or "list of objects" in exc.message, str(exc)
        return
    finally:
        os.unlink(path)
    for row in loaded:  # whatever loads is canonical
        assert ("messages" in row) != ("text" in row)
        if "messages" in row:
            assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                       for m in row["messages"])

"""Where rows come from: files (.jsonl/.json/.csv), built-in sets, registered hub datasets.

`load_dataset_rows(spec)` returns canonical rows; each keeps `where` ("file:line") so that any later
error names it; a file, a registered set or a hub set is checked whole and every bad row is reported. With
`needs_reply` (training rows) every conversation must end with the assistant's reply. `name#N` samples N rows
(more than the set holds: the set is repeated, then topped up with a random sample); `split_train_val` holds
rows out for validation. Conversation rows only: preference sets are read by `data.preference`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import random
from typing import Any, Iterable, Iterator, Sequence

from martlet.data.builtin import math_gen
from martlet.data.formats import RowError, to_canonical
from martlet.errors import DatasetErrors, MartletError, did_you_mean

_DIR = os.path.dirname(__file__)
_BUILTIN_DIR = os.path.join(_DIR, "builtin")
_extra: dict[str, dict[str, Any]] = {}


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, dict[str, Any]]:
    with open(os.path.join(_DIR, "datasets.json"), encoding="utf-8") as fh:
        return json.load(fh)


def dataset_registry() -> dict[str, dict[str, Any]]:
    return {**_registry(), **_extra}


def register_dataset(name: str, *, path: str | None = None, hf_id: str | None = None, ms_id: str | None = None,
                     columns: dict[str, str] | None = None, rows: Sequence[dict[str, Any]] | None = None,
                     exist_ok: bool = False, description: str = "") -> None:
    """Register a dataset by name (a file, hub ids or rows in memory), with an optional column mapping."""
    if name in dataset_registry() and not exist_ok:
        raise MartletError(f"dataset '{name}' is already registered.", hint="Pass exist_ok=True to replace it.")
    if not (path or hf_id or ms_id or rows is not None):
        raise MartletError(f"dataset '{name}' needs a path, a hub id or rows.", field=name)
    _extra[name] = {"path": path, "hf_id": hf_id, "ms_id": ms_id, "columns": columns or {},
                    "rows": list(rows) if rows is not None else None, "description": description}


_INFO_KEYS = {"dataset_path": "path", "file": "path", "path": "path", "hf_dataset_id": "hf_id", "hf_id": "hf_id",
              "ms_dataset_id": "ms_id", "ms_id": "ms_id", "columns": "columns", "description": "description"}


def register_dataset_info(path: str) -> list[str]:
    """Register every entry of a `--custom_dataset_info` JSON file; returns the names.

    {"name": {"dataset_path": "rel/or/abs.jsonl" | "hf_dataset_id": ... | "ms_dataset_id": ...,
              "columns": {"question": "query", "answer": "response"}}}; relative paths are relative to the file.
    """
    if not os.path.isfile(path):
        raise MartletError("custom dataset info file not found.", file=path, field="custom_dataset_info")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise MartletError(f"malformed JSON: {getattr(exc, 'msg', exc)}.", file=path, line=line) from None
    if not isinstance(data, dict):
        raise MartletError("must map dataset names to entries.", file=path)
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise MartletError("each entry must be an object.", file=path, field=name)
        unknown = [k for k in entry if k not in _INFO_KEYS]
        if unknown:
            raise MartletError(f"unknown key '{unknown[0]}'.{did_you_mean(unknown[0], _INFO_KEYS)}", file=path,
                               field=name)
        kwargs = {_INFO_KEYS[k]: v for k, v in entry.items()}
        columns = kwargs.get("columns", {})
        if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
            raise MartletError("'columns' must map source column names to names such as query, response.",
                               file=path, field=name)
        if kwargs.get("path") and not os.path.isabs(kwargs["path"]):
            kwargs["path"] = os.path.join(os.path.dirname(os.path.abspath(path)), kwargs["path"])
        if kwargs.get("path") and not os.path.isfile(kwargs["path"]):
            raise MartletError(f"dataset file not found: {kwargs['path']}", file=path, field=name)
        try:
            register_dataset(name, exist_ok=True, **kwargs)
        except MartletError as exc:
            raise MartletError(exc.message, file=path, field=name) from None
    return list(data)


def parse_spec(spec: str) -> tuple[str, int | None]:
    """'name#200' -> ('name', 200)."""
    name, sep, count = spec.rpartition("#") if "#" in spec else (spec, "", "")
    if not sep:
        return spec, None
    if not count.isdigit() or int(count) <= 0:
        raise MartletError(f"'{spec}': the part after # must be a positive row count.", field="dataset")
    return name, int(count)


# raw readers: yield (line number, raw row) ----------------------------------------------------------------
def _read_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, MartletError(f"not valid UTF-8 ({exc.reason} at byte {exc.start}).", file=path,
                                           line=number)
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, MartletError(f"malformed JSON: {exc.msg} (column {exc.colno}).", file=path, line=number)


def _read_json(path: str) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    decoder = json.JSONDecoder()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MartletError(f"malformed JSON: {exc.msg} (column {exc.colno}).", file=path, line=exc.lineno) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise MartletError("a .json dataset must hold a list of objects.", file=path, line=1)
    # walk the array again to learn each element's line (json.loads keeps no positions)
    index = text.index("[") + 1 if text.lstrip().startswith("[") else 0
    for item in data:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        line = text.count("\n", 0, index) + 1
        if index < len(text):
            _, end = decoder.raw_decode(text, index)
            index = end
        yield line, item


def _read_text(path: str) -> str:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise MartletError(f"not valid UTF-8 ({exc.reason}).", file=path, line=line) from None


def _read_csv(path: str) -> Iterator[tuple[int, Any]]:
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        for row in reader:
            if None in row:
                yield reader.line_num, MartletError("a row has more cells than the header.", file=path,
                                                    line=reader.line_num)
                continue
            yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "") or k in ("input", "system")}
    except csv.Error as exc:
        raise MartletError(f"malformed CSV: {exc}", file=path, line=reader.line_num) from None


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}


def read_file(path: str, columns: dict[str, str] | None = None, *,
              needs_reply: bool = False) -> list[dict[str, Any]]:
    """Canonical rows of a dataset file. The whole file is checked: every bad row is reported as
    file:line: field (the first few in full, then a count), and nothing is returned if any row is bad."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in READERS:
        raise MartletError(f"unsupported file type '{ext}': use .jsonl, .json or .csv.", file=path)
    rows = canonical_rows(((path, line, raw) for line, raw in READERS[ext](path)), columns, needs_reply)
    if not rows:
        raise MartletError("the dataset is empty.", file=path)
    return rows


def canonical_rows(raws: Iterable[tuple[str, int | None, Any]], columns: dict[str, str] | None = None,
                   needs_reply: bool = False) -> list[dict[str, Any]]:
    """Canonical rows of (file, line, raw row) items; DatasetErrors with every bad one (a reader's
    MartletError for a line it could not parse counts as one)."""
    rows, errors = [], []
    for file, line, raw in raws:
        try:
            if isinstance(raw, MartletError):
                raise raw
            rows.append(_canonical(raw, file, line, columns, needs_reply))
        except MartletError as exc:
            errors.append(exc)
    if errors:
        raise DatasetErrors(errors)
    return rows


def _canonical(raw: Any, file: str, line: int | None, columns: dict[str, str] | None,
               needs_reply: bool = False) -> dict[str, Any]:
    if columns and isinstance(raw, dict):
        raw = {columns.get(k, k): v for k, v in raw.items()}
    try:
        row = to_canonical(raw, needs_reply=needs_reply)
    except RowError as exc:
        raise MartletError(exc.message, file=file, line=line, field=exc.field, hint=exc.hint) from None
    row["where"] = f"{file}:{line}" if line is not None else file
    return row


# built-in sets ------------------------------------------------------------------------------------------
def _names(values: Sequence[str], what: str, dataset: str) -> tuple[str, str]:
    if not values:
        raise MartletError(f"dataset '{dataset}' needs --{what}.", field=what,
                           hint=f"For example: --{what} 小鹦 Martlet (a Chinese and an English one).")
    return (values[0], values[-1])


def math_entry_rows(entry: dict[str, Any], count: int | None, seed: int) -> list[dict[str, Any]]:
    """The generated rows of a built-in math entry of datasets.json (its language, level and default count)."""
    return math_gen.generate(count or entry.get("count", 2000), seed=seed, lang=entry.get("lang", "mixed"),
                             level=entry.get("level", "all"))


def _builtin_rows(name: str, entry: dict[str, Any], count: int | None, seed: int,
                  model_name: Sequence[str], model_author: Sequence[str]) -> list[dict[str, Any]]:
    kind = entry["builtin"]
    if kind == "math":
        raws = math_entry_rows(entry, count, seed)
        return canonical_rows((name, i, {"query": r["query"], "response": r["response"]})
                              for i, r in enumerate(raws, start=1))
    path = os.path.join(_BUILTIN_DIR, f"{kind}.jsonl")
    if not os.path.isfile(path):  # e.g. the preference sets: `data.preference` reads them
        raise MartletError(f"built-in dataset '{name}' holds no conversations.", field="dataset",
                           hint="`martlet list-datasets` lists the built-in names.")
    if kind != "self_cognition":
        return read_file(path, needs_reply=True)
    names = _names(model_name, "model_name", name)
    authors = _names(model_author, "model_author", name)
    texts_of = []
    for line, raw in _read_jsonl(path):
        zh = raw.get("lang") == "zh"
        fill = {"{{NAME}}": names[0] if zh else names[1], "{{AUTHOR}}": authors[0] if zh else authors[1]}
        texts = {k: raw[k] for k in ("query", "response")}
        for key, text in texts.items():
            for placeholder, value in fill.items():
                text = text.replace(placeholder, value)
            texts[key] = text
        texts_of.append((path, line, texts))
    return canonical_rows(texts_of)


def _hub_rows(name: str, entry: dict[str, Any], needs_reply: bool = False) -> list[dict[str, Any]]:
    use_ms = os.environ.get("USE_MODELSCOPE_HUB") == "1" and entry.get("ms_id")
    hub_id = entry.get("ms_id") if use_ms or not entry.get("hf_id") else entry.get("hf_id")
    try:
        if use_ms or not entry.get("hf_id"):
            from modelscope import MsDataset

            data = MsDataset.load(hub_id, split="train")
        else:
            import datasets

            data = datasets.load_dataset(hub_id, split="train")
    except ImportError:
        raise MartletError(f"dataset '{name}' is on ModelScope ({hub_id}): install modelscope.",
                           hint="pip install 'martlet[modelscope]'") from None
    except Exception as exc:  # offline, missing, auth: many classes
        raise MartletError(f"cannot load dataset '{name}' ({hub_id}) from the hub: {str(exc).splitlines()[0]}",
                           field="dataset", hint="Without a network, pass a local file instead.") from None
    return canonical_rows(((f"{hub_id}[train]", i, dict(raw)) for i, raw in enumerate(data, start=1)),
                          entry.get("columns"), needs_reply)


def find_registered(name: str) -> tuple[str, dict[str, Any]] | None:
    """(registered name, entry) of a name (`_` read as `-`) or of a hub id, or None."""
    registry = dataset_registry()
    if name in registry:
        return name, registry[name]
    normalized = name.replace("_", "-")
    if normalized in registry:
        return normalized, registry[normalized]
    for key, entry in registry.items():
        if name in (entry.get("hf_id"), entry.get("ms_id")):
            return key, entry
    return None


def sample_rows(rows: list[dict[str, Any]], count: int | None, seed: int) -> list[dict[str, Any]]:
    """`count` rows: a random subset, or the whole set repeated and topped up when count exceeds it."""
    if count is None or count == len(rows):
        return rows
    rng = random.Random(seed)
    if count < len(rows):
        return [rows[i] for i in sorted(rng.sample(range(len(rows)), count))]
    whole, rest = divmod(count, len(rows))
    return rows * whole + [rows[i] for i in sorted(rng.sample(range(len(rows)), rest))]


def split_train_val(rows: list[Any], ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out round(len * ratio) rows (at least one when ratio > 0), chosen by `seed`."""
    if ratio <= 0 or len(rows) < 2:
        return rows, []
    n_val = min(len(rows) - 1, max(1, round(len(rows) * ratio)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_index = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in val_index]
    val = [rows[i] for i in sorted(val_index)]
    return train, val


def load_dataset_rows(spec: str, *, seed: int = 42, model_name: Sequence[str] = (), model_author: Sequence[str] = (),
                      needs_reply: bool = False) -> list[dict[str, Any]]:
    """Canonical rows of one --dataset entry (a name, a hub id or a file, optionally with #N); with
    `needs_reply` (training rows) every conversation must end with the assistant's reply."""
    name, count = parse_spec(spec)
    found = find_registered(name)
    if found is not None:
        key, entry = found
        if entry.get("builtin"):
            rows = _builtin_rows(key, entry, count, seed, model_name, model_author)
            return rows if entry["builtin"] == "math" else sample_rows(rows, count, seed)
        if entry.get("rows") is not None:
            rows = canonical_rows(((key, i, dict(r)) for i, r in enumerate(entry["rows"], start=1)),
                                  entry.get("columns"), needs_reply)
        elif entry.get("path"):
            rows = read_file(entry["path"], entry.get("columns"), needs_reply=needs_reply)
        else:
            rows = _hub_rows(key, entry, needs_reply)
        return sample_rows(rows, count, seed)
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        return sample_rows(read_file(path, needs_reply=needs_reply), count, seed)
    if os.path.splitext(name)[1].lower() in READERS or os.sep in name and not looks_like_hub_id(name):
        raise MartletError("dataset file not found.", file=name, field="dataset")
    if looks_like_hub_id(name):
        return sample_rows(_hub_rows(name, {"hf_id": name, "ms_id": name}, needs_reply), count, seed)
    raise MartletError(f"unknown dataset '{name}'.{did_you_mean(name, dataset_registry())}", field="dataset",
                       hint="`martlet list-datasets` lists the built-in names; a file path must exist.")


def looks_like_hub_id(name: str) -> bool:
    """'owner/name' where no folder 'owner' exists here."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(parts[0])

"""Arguments are flat dataclasses; each field's help is written once and becomes `--help`.

`arg()` declares a field; `parse_cli()` turns a command line (and an optional --config file) into an
instance, with an error and a "did you mean" for anything unknown. Nothing here rewrites fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import types
import typing
from typing import Any, Callable, ClassVar, Collection, Literal, Protocol, Sequence, TypeVar, get_args, get_origin

from martlet.errors import MartletError, did_you_mean

T = TypeVar("T")
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class Arguments(Protocol):
    """Any argument dataclass (SftArguments, InferArguments, ...)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


class ExtraKeys(Protocol):
    """The keys a dict field takes besides the class's own fields (e.g. transformers' TrainingArguments fields):
    any such key on the command line or in a config file is routed into that field."""

    def names(self) -> Collection[str]:
        """Every accepted key (may import a heavy library: called only when a key is not the class's own)."""

    def convert(self, values: dict[str, Any], where: str) -> dict[str, Any]:
        """The values typed as their keys want; MartletError naming the key for a bad key or value."""


# An option whose values go to one or more fields, by their form: raw value -> {field: raw value}
Route = Callable[[Any], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: an interval (written "[0, 1)", "(0, inf)", "[1, inf)"), plus the
    values that mean "unset" (e.g. -1). None, where the field is Optional, always means unset."""

    low: float
    high: float
    low_open: bool
    high_open: bool
    unset: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str, unset: Sequence[float] = ()) -> "Range":
        match = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^\]\s)]+)\s*([\])])", text)
        if not match:
            raise ValueError(f"bounds {text!r}: write an interval such as '[0, 1)' or '(0, inf)'")
        return cls(float(match[2]), float(match[3]), match[1] == "(", match[4] == ")", tuple(unset))

    def __contains__(self, value: float) -> bool:
        if value in self.unset:
            return True
        if math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low == -math.inf and self.high == math.inf:
            text = "a number (not nan)"
        elif self.high == math.inf:
            text = f"greater than {low}" if self.low_open else f"at least {low}"
        else:
            text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return text + "".join(f", or {_number(v)}" for v in self.unset)


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    return str(int(value)) if value == int(value) else str(value)


def arg(default: Any = None, help: str = "", *, aliases: Sequence[str] = (), choices: Sequence[Any] | None = None,
        bounds: str | None = None, unset: Sequence[float] = (), spellings: dict[str, Any] | None = None,
        extra_keys: ExtraKeys | None = None) -> Any:
    """A dataclass field with its help text, CLI aliases and allowed values.

    `bounds` is the interval a number must lie in ("[0, 1)", "[1, inf)"), `unset` the values outside it that
    mean "not set" (e.g. -1). The help (so `--help` and the argument reference) ends with the range, and a
    value outside it is an error naming the field, when parsed and in `validate()`. `spellings` maps other
    names of a value to Martlet's (ms-swift 3's "bfloat16" -> "bf16"), read as Martlet's when parsed.
    `extra_keys` (a dict field) takes the keys outside the class's own fields that it accepts (see ExtraKeys).
    """
    rng = Range.parse(bounds, unset) if bounds else None
    text = f"{help} Must be {rng}." if rng else help
    if spellings:
        text += " Also accepted: " + ", ".join(f"{k} ({v})" for k, v in spellings.items()) + "."
    meta = {"help": text, "aliases": tuple(aliases), "choices": tuple(choices) if choices else None, "range": rng,
            "spellings": dict(spellings or {}), "extra_keys": extra_keys}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return tp, False


def field_kind(cls: type, name: str) -> tuple[Any, bool, bool]:
    """(scalar type, optional?, list?) of a field, from the resolved type hints."""
    hints = typing.get_type_hints(cls)
    tp, optional = _unwrap_optional(hints[name])
    if get_origin(tp) in (list, typing.List):
        (inner,) = get_args(tp) or (str,)
        inner, _ = _unwrap_optional(inner)
        return inner, optional, True
    return tp, optional, False


def convert(value: Any, tp: Any, name: str, where: str = "command line") -> Any:
    """Convert one CLI string (or config value) to the field's scalar type."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ("none", "null") and tp is not str:
        return None
    try:
        if get_origin(tp) is Literal:
            allowed = get_args(tp)
            if value not in allowed:
                raise ValueError(f"must be one of {', '.join(map(str, allowed))}")
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("must be true or false")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("must be an integer")
            return int(value)
        if tp is float:
            return float(value)
        if tp is str or tp is Any:
            return str(value) if not isinstance(value, (dict, list)) else value
        if tp is dict or get_origin(tp) is dict:
            return json.loads(value) if isinstance(value, str) else dict(value)
        return tp(value)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise MartletError(f"invalid value {value!r}: {exc}", file=None if where == "command line" else where,
                           field=name) from None


def _check_choice(cls: type, name: str, value: Any) -> None:
    choices = dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index(name)].metadata.get("choices")
    if choices and value is not None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v not in choices:
                raise MartletError(f"invalid value {v!r}: choose one of {', '.join(map(str, choices))}.",
                                   field=name)


def _check_range(cls: type, name: str, value: Any, where: str = "command line") -> None:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    rng = field.metadata.get("range")
    if rng is None:
        return
    if isinstance(value, (list, tuple)):  # a list of numbers: each one
        for item in value:
            _check_range(cls, name, item, where)
        return
    if value is None:
        if not field_kind(cls, name)[1]:
            raise MartletError(f"needs a number: {rng}.", file=None if where == "command line" else where,
                               field=name)
        return
    if value not in rng:
        raise MartletError(f"must be {rng} (got {value!r}).", file=None if where == "command line" else where,
                           field=name)


def check_ranges(args: Arguments) -> None:
    """MartletError naming the first field whose value lies outside its declared range (see `arg`)."""
    for f in dataclasses.fields(args):
        _check_range(type(args), f.name, getattr(args, f.name))


def option_names(cls: type) -> dict[str, str]:
    """Every accepted spelling (name and aliases, '-' or '_') mapped to the field name."""
    names: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        for spelling in (f.name, *f.metadata.get("aliases", ())):
            names[spelling] = f.name
            names[spelling.replace("_", "-")] = f.name
    return names


def _spellings(names: dict[str, str]) -> list[str]:
    """Suggestions: field names first, then aliases, each once (no '-' variants)."""
    fields = sorted(set(names.values()))
    return fields + sorted(n for n in names if "-" not in n and n not in fields)


def _extra_field(cls: type) -> tuple[str, ExtraKeys] | None:
    """(name, keys) of the class's dict field that takes keys outside its own fields, if it has one."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("extra_keys") is not None:
            return f.name, f.metadata["extra_keys"]
    return None


def _refuse_unknown(unknown: list[str], choices: list[str], file: str | None) -> None:
    """Every unknown key at once, each with its "did you mean" among `choices`."""
    if len(unknown) == 1:
        key = unknown[0]
        raise MartletError(f"unknown argument '{key}'.{did_you_mean(key.replace('-', '_'), choices)}",
                           file=file, hint="Run with --help to list the arguments.")
    if unknown:
        suggestions = [did_you_mean(key.replace("-", "_"), choices).strip() for key in unknown]
        listed = ", ".join(f"'{key}'" + (f" ({hint})" if hint else "") for key, hint in zip(unknown, suggestions))
        raise MartletError(f"{len(unknown)} unknown arguments: {listed}.", file=file,
                           hint="Run with --help to list the arguments.")


def _split_known(cls: type, values: dict[str, Any], names: dict[str, str],
                 file: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the values under the class's own spellings, those its extra-keys field takes, by key); MartletError
    for the rest, with a "did you mean" among both."""
    unknown = [key for key in values if key not in names]
    extra = _extra_field(cls)
    routed: dict[str, Any] = {}
    choices = _spellings(names)
    if unknown and extra:
        accepted = set(extra[1].names())
        routed = {key.replace("-", "_"): values[key] for key in unknown if key.replace("-", "_") in accepted}
        unknown = [key for key in unknown if key.replace("-", "_") not in accepted]
        choices += sorted(accepted - set(choices))
    _refuse_unknown(unknown, choices, file)
    return {k: v for k, v in values.items() if k in names}, routed


def _as_mapping(raw: Any, file: str | None, field: str) -> dict[str, Any]:
    """A dict field's raw value (a JSON object as text, or a mapping from a config file) as a dict."""
    if isinstance(raw, list):
        if len(raw) != 1:
            raise MartletError(f"expects one JSON object, got {len(raw)} values.", file=file, field=field)
        raw = raw[0]
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MartletError(f"invalid JSON: {exc}.", file=file, field=field) from None
    if not isinstance(raw, dict):
        raise MartletError(f"expects a JSON object of name: value, got {raw!r}.", file=file, field=field)
    return dict(raw)


def _targets(cls: type, key: str, raw: Any, names: dict[str, str]) -> list[tuple[str, Any]]:
    """(field, raw value) pairs an option gives: its field, or those a route of the class (ROUTES) picks."""
    route: Route | None = getattr(cls, "ROUTES", {}).get(key.replace("-", "_"))
    return list(route(raw).items()) if route else [(names[key], raw)]


def by_field(cls: type, values: dict[str, Any], where: str = "command line") -> dict[str, Any]:
    """Raw values keyed by field name. Every unknown key is reported at once (each with its "did you mean");
    one field given under two spellings (a name and an alias) is an error naming both. Keys the class's
    extra-keys field takes (see ExtraKeys) are gathered into it as a dict."""
    names = option_names(cls)
    file = None if where == "command line" else where
    own, routed = _split_known(cls, values, names, file)
    dash = "--" if file is None else ""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, raw in own.items():
        for name, part in _targets(cls, key, raw, names):
            if name in out:
                raise MartletError(f"given twice, as {dash}{given_as[name]} and as {dash}{key}: give it once.",
                                   file=file, field=name)
            out[name], given_as[name] = part, key
    extra = _extra_field(cls)
    if extra and (routed or extra[0] in out):
        merged = _as_mapping(out.get(extra[0]), file, extra[0])
        for key, raw in routed.items():
            if key in merged:
                raise MartletError(f"given twice, as {dash}{key} and in {dash}{extra[0]}: give it once.",
                                   file=file, field=key)
            merged[key] = raw
        out[extra[0]] = merged
    return out


def _respelled(cls: type, name: str, value: Any) -> Any:
    """The value with another spelling of it (the field's `spellings`) read as Martlet's."""
    spellings = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("spellings")
    if not spellings or value is None:
        return value
    if isinstance(value, list):
        return [spellings.get(v, v) for v in value]
    return spellings.get(value, value)


def build(cls: type[T], values: dict[str, Any], where: str = "command line",
          sources: dict[str, str] | None = None) -> T:
    """An instance of `cls` from raw values keyed by any accepted spelling; unknown keys are errors. A bad value
    names `sources[field]` (the config file it came from), else `where`."""
    kwargs: dict[str, Any] = {}
    extra = _extra_field(cls)
    for name, raw in by_field(cls, values, where).items():
        where_from = (sources or {}).get(name, where)
        if extra and name == extra[0]:
            kwargs[name] = extra[1].convert(raw, where_from)
            continue
        tp, optional, is_list = field_kind(cls, name)
        if is_list:
            items = raw if isinstance(raw, list) else [raw]
            value = [convert(v, tp, name, where_from) for v in items]
        else:
            if isinstance(raw, list):
                if len(raw) != 1:
                    raise MartletError(f"expects one value, got {len(raw)}: {raw}", field=name)
                raw = raw[0]
            unset = optional and isinstance(raw, str) and raw.lower() in ("none", "null")  # a text field too
            value = None if unset else convert(raw, tp, name, where_from)
        value = _respelled(cls, name, value)
        _check_choice(cls, name, value)
        _check_range(cls, name, value, where_from)
        kwargs[name] = value
    return cls(**kwargs)


def _read_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise MartletError("config file not found.", file=path)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different classes
        raise MartletError(f"cannot parse config: {exc}", file=path) from None
    if not isinstance(data, dict):
        raise MartletError("a config file must hold a mapping of argument names to values.", file=path)
    return data


def split_argv(argv: Sequence[str]) -> dict[str, Any]:
    """`--name v1 v2 --flag=x` -> {'name': ['v1', 'v2'], 'flag': ['x']}; a bare `--flag` means true.
    A flag given twice is an error (it would otherwise silently take the last value)."""
    values: dict[str, Any] = {}
    key: str | None = None
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            if name in values:
                raise MartletError(f"--{name} is given twice: give it once.")
            key = name
            values[key] = [value] if eq else []
        elif key is None:
            hint = " To read arguments from a file, write --config FILE." if token.endswith((".yaml", ".yml", ".json")) else ""
            raise MartletError(f"unexpected value {token!r}: arguments are written --name value.{hint}")
        else:
            values[key].append(token)
    return {k: (v if v else ["true"]) for k, v in values.items()}


def parse_cli(cls: type[T], argv: Sequence[str] | None = None) -> T:
    """Parse `argv` (default sys.argv[1:]); `--config file.(json|yaml)` supplies defaults first, which the
    command line may override (each once)."""
    raw = split_argv(list(sys.argv[1:] if argv is None else argv))
    config = raw.pop("config", None)
    values: dict[str, Any] = {}
    if config:
        path = config[0]
        values.update(build_dict(cls, _read_config(path), where=path))
    sources = dict.fromkeys(values, config[0]) if config else {}
    for name, value in by_field(cls, raw).items():
        if isinstance(value, dict) and isinstance(values.get(name), dict):
            value = {**values[name], **value}  # an extra-keys field: the config's keys, the command line's win
        values[name] = value
        sources.pop(name, None)
    return build(cls, values, sources=sources)


def build_dict(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a config mapping's keys now (all of them), so an unknown key names the config file; keyed by field."""
    data = by_field(cls, data, where)
    return {k: (v if isinstance(v, (list, dict)) else [v]) if v is not None else ["none"] for k, v in data.items()}


def format_help(cls: type, prog: str) -> str:
    """`--help` text from the fields' metadata, grouped by the class that declares them."""
    lines = [f"usage: {prog} [--config FILE] [--name value ...]", ""]
    if cls.__doc__:
        lines += [cls.__doc__.strip().splitlines()[0], ""]
    seen: set[str] = set()
    for base in [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]:
        declared = base.__dict__.get("__annotations__", {})
        own = [f for f in dataclasses.fields(base) if f.name in declared and f.name not in seen]
        if not own:
            continue
        lines.append(f"{base.__name__}:")
        for f in own:
            seen.add(f.name)
            tp, _, is_list = field_kind(cls, f.name)
            aliases = "".join(f", --{a}" for a in f.metadata.get("aliases", ()))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            kind = getattr(tp, "__name__", str(tp)) + (" ..." if is_list else "")
            lines.append(f"  --{f.name}{aliases} ({kind}, default {default!r})")
            if f.metadata.get("help"):
                lines.append(f"      {f.metadata['help']}")
        lines.append("")
    return "\n".join(lines)


def to_dict(args: Arguments) -> dict[str, Any]:
    """A JSON-able dict of the arguments (what `sft_args.json` holds)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}

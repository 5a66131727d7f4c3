"""Typed records from plain data: the one parser for options, settings, manifests and results.

Backend options (``-o KEY=VALUE``), benchmark settings, manifest entries and benchmark measurements are
dataclasses. :func:`parse` builds one from a mapping (JSON, TOML or the command line), checking every key
against the fields: unknown keys are refused naming the known ones; each value is checked against the
field's annotation (converted only where nothing is lost: an int for a float, a list for a tuple,
``"512x768"`` for a ``(height, width)`` pair); ranges, choices and normalisation (``"a,b"`` -> a list, see
:func:`comma_list`) come from the field's metadata (:func:`option`). :func:`to_data` is the way back to plain data.

Messages share one style, whatever the record::

    unknown tensorrt export option(s) optimisation_level; it takes: profile, flavour, ...
    tensorrt export option optimization_level must be 0-5, got 9
    unknown attention 'flash'; choose one of: original, split_einsum
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import lru_cache
from typing import Any, Callable, Literal, Mapping, Union

from diffship.errors import ConfigError, DiffshipError, ShapeError

#: field metadata keys understood by :func:`parse`.
_CHOICES, _MIN, _MAX, _NORMALIZE = "choices", "minimum", "maximum", "normalize"


def option(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None, normalize: Callable[[Any], Any] | None = None,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with validation metadata.

    Args:
        default: the default value (omit for a required field).
        choices: the only values accepted (after ``normalize``).
        minimum / maximum: inclusive bounds of a number.
        normalize: applied to a given value before it is checked (``"tensorrt-rtx"`` -> ``"tensorrt_rtx"``).
        default_factory: as for :func:`dataclasses.field`.
    """
    meta = {k: v for k, v in ((_CHOICES, choices), (_MIN, minimum), (_MAX, maximum), (_NORMALIZE, normalize))
            if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def parse_hw(item: Any, what: str = "size") -> tuple[int, int]:
    """``"512x768"`` (or ``(512, 768)``) -> ``(512, 768)``: height, width. Values are not range-checked."""
    try:
        height, width = (int(v) for v in (item.lower().split("x") if isinstance(item, str) else item))
    except (ValueError, TypeError, AttributeError):
        raise ShapeError(f"{what}: {item!r} is not HEIGHTxWIDTH, e.g. 512x512") from None
    return height, width


def comma_list(value: Any) -> Any:
    """``"sm86,sm89"`` -> ``["sm86", "sm89"]`` (command-line lists); other values as they are."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def names(cls: type) -> list[str]:
    """The field names of record class ``cls``, in order."""
    return [f.name for f in dataclasses.fields(cls)]


def parse(cls: type, data: Mapping[str, Any], what: str, *, where: str = "",
          error: type[DiffshipError] = ConfigError) -> Any:
    """Build dataclass ``cls`` from ``data``, validating every key and value.

    Args:
        cls: the record class.
        data: plain data by field name.
        what: the noun of one key in messages ("tensorrt export option", "setting", "manifest key").
        where: where the data came from, prefixed to messages ("bench_presets.toml [tiny]").
        error: the exception type raised.

    Raises:
        error: an unknown key, a missing required key, or a value of the wrong type, range or choice.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(data, Mapping):
        raise error(f"{prefix}expected a table of {what}s, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise error(f"{prefix}unknown {what}(s) {', '.join(map(str, unknown))}; it takes: {', '.join(fields) or 'none'}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.init]
    if missing:
        raise error(f"{prefix}{what}(s) {', '.join(missing)} missing")
    hints = _hints(cls)
    values = {}
    for key, value in data.items():
        f = fields[key]
        meta = f.metadata
        if _NORMALIZE in meta and value is not None:
            value = meta[_NORMALIZE](value)
        try:
            value = _check(hints[key], value, _At(what, f"{where} {key}".strip(), f"{what} {key}", error))
        except _Mismatch as bad:
            raise error(f"{prefix}{what} {key} must be {bad.expected}, got {value!r}") from None
        except _Invalid as bad:
            raise error(f"{prefix}{bad}") from None
        _check_meta(meta, key, value, what, prefix, error)
        values[key] = value
    return cls(**values)


def _check_meta(meta: Mapping[str, Any], key: str, value: Any, what: str, prefix: str,
                error: type[DiffshipError]) -> None:
    if value is None:
        return
    if _CHOICES in meta and value not in meta[_CHOICES]:
        raise error(f"{prefix}unknown {key} {value!r}; choose one of: {', '.join(map(str, meta[_CHOICES]))}")
    lo, hi = meta.get(_MIN), meta.get(_MAX)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{lo}-{hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise error(f"{prefix}{what} {key} must be {bounds}, got {value!r}")


class _Mismatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


_NOUNS = {bool: "boolean", int: "whole number", float: "number", str: "string"}


def _describe(hint: Any) -> str:
    """What a value of ``hint`` must be, for messages: "true or false", "a list of strings"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return "true or false"
    if hint in _NOUNS:
        return f"a {_NOUNS[hint]}"
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple and args == (int, int):
        return "HEIGHTxWIDTH"
    if origin in (tuple, list):
        element = args[0] if args else None
        return f"a list of {_NOUNS[element]}s" if element in _NOUNS else "a list"
    if origin is dict:
        element = args[1] if args else None
        return f"a table of {_NOUNS[element]}s" if element in _NOUNS else "a table"
    if dataclasses.is_dataclass(hint):
        return f"a table of {hint.__name__} fields"
    return getattr(hint, "__name__", str(hint))


def _other_kind(hint: Any, value: Any) -> bool:
    """Whether ``value`` is data for another record than ``hint``: its ``Literal`` field (a ``kind``)
    names another kind. Unions of records are told apart that way, so errors name the right record."""
    if not (dataclasses.is_dataclass(hint) and isinstance(value, Mapping)):
        return False
    for name, annotation in _hints(hint).items():
        if typing.get_origin(annotation) is Literal and name in value and value[name] not in typing.get_args(annotation):
            return True
    return False


class _Invalid(Exception):
    """A value that is wrong in a way its own message says best (a malformed HEIGHTxWIDTH)."""


@dataclasses.dataclass(frozen=True)
class _At:
    """Where a value is being checked: the record noun, the location of a nested record, the label of the
    field in messages, and the error type."""

    noun: str
    where: str
    label: str
    error: type[DiffshipError]


def _check(hint: Any, value: Any, at: _At) -> Any:
    """``value`` as ``hint`` asks, or :class:`_Mismatch` naming what was expected."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        failed: DiffshipError | None = None
        for alternative in args:
            if _other_kind(alternative, value):
                continue
            try:
                return _check(alternative, value, at)
            except _Mismatch:
                continue
            except DiffshipError as exc:  # a record alternative of the right kind, with a bad key
                failed = failed or exc
        if failed is not None:
            raise failed
        raise _Mismatch(_describe(hint))
    if hint in _SCALARS:
        if _SCALARS[hint](value):
            return float(value) if hint is float else str(value) if hint is str else value
        raise _Mismatch(_describe(hint))
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch(_describe(hint))
    if origin is tuple and args == (int, int):  # (height, width)
        try:
            return parse_hw(value, at.label)
        except ShapeError as exc:
            raise _Invalid(str(exc)) from None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(_describe(hint))
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise _Mismatch(_describe(hint))
        kinds = list(args) if origin is tuple and args and args[-1] is not Ellipsis else [args[0] if args else Any] * len(value)
        try:
            items = [_check(k, v, at) for k, v in zip(kinds, value)]
        except _Mismatch:
            raise _Mismatch(_describe(hint)) from None
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch(_describe(hint))
        key_kind, value_kind = args or (Any, Any)
        try:
            return {_check(key_kind, k, at): _check(value_kind, v, replace_where(at, k)) for k, v in value.items()}
        except _Mismatch:
            raise _Mismatch(_describe(hint)) from None
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch(_describe(hint))
        return parse(hint, value, at.noun, where=at.where, error=at.error)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch(_describe(hint))
    return value


def replace_where(at: _At, key: Any) -> _At:
    """``at`` one level down, in the entry ``key`` of a table."""
    return dataclasses.replace(at, where=f"{at.where} {key}".strip())


#: scalar types and the values each accepts (converted where nothing is lost).
_SCALARS: dict[type, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v),
    # Command-line values are read as JSON where they parse: "-o version=1.0" arrives as a number.
    str: lambda v: isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool)),
    type(None): lambda v: v is None,
}


def to_data(record: Any, *, drop_none: bool = False) -> Any:
    """A record (or a structure of them) as plain JSON-ready data: dataclasses become dicts, tuples
    lists. ``drop_none`` leaves out the record's own fields whose value is None (optional facts not
    recorded); nested records keep theirs."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_data(getattr(record, f.name)) for f in dataclasses.fields(record)
                if not (drop_none and getattr(record, f.name) is None)}
    if isinstance(record, (list, tuple)):
        return [to_data(v) for v in record]
    if isinstance(record, dict):
        return {k: to_data(v) for k, v in record.items()}
    return record

"""Bundled configuration data, and the loader that validates it.

``tolerances.toml`` (shipped as package data next to this module) holds the parity tolerances per
backend and precision; its comments document every key. :func:`load_tolerances` reads it, or a user
file with the same layout, and raises :class:`~diffship.errors.ConfigError` naming the file, the table
and the key for anything it does not understand, so a typo never silently disables a check.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from diffship.errors import ConfigError
from diffship.parity.metrics import ImageTolerance, TensorTolerance, Tolerances

#: The tolerances shipped with diffship.
BUNDLED_TOLERANCES = Path(__file__).with_name("tolerances.toml")

_SECTIONS = ("component", "image")
_TENSOR_KEYS = tuple(f.name for f in fields(TensorTolerance))
_IMAGE_KEYS = tuple(f.name for f in fields(ImageTolerance))
# Similarity scores are at most 1, so a larger minimum could never pass.
_UNIT_KEYS = frozenset({"cosine_min", "ssim_min"})
_TOML_TYPES = {str: "string", bool: "boolean", dict: "table", list: "array", int: "integer", float: "float"}


def load_tolerances(backend: str, precision: str, path: Path | None = None) -> Tolerances:
    """Load the tolerances of one backend x precision.

    The whole file is validated, not only the requested tables, so an error anywhere is reported
    the first time the file is used.

    Args:
        backend: backend name, e.g. ``"onnx"``.
        precision: export precision, e.g. ``"fp32"`` or ``"fp16"``.
        path: a user TOML file with the bundled file's layout; ``None`` reads the bundled file.

    Returns:
        The tolerances, with per-component overrides already merged over the defaults.

    Raises:
        ConfigError: the file cannot be read or parsed, is invalid, or has no tables for
            ``backend.precision`` (the message lists the available ones).
    """
    file = Path(path) if path is not None else BUNDLED_TOLERANCES
    table = parse_tolerances(_read_toml(file), str(file))
    try:
        return table[(backend, precision)]
    except KeyError:
        available = ", ".join(f"{b}.{p}" for b, p in sorted(table)) or "none"
        raise ConfigError(
            f"{file}: no tolerances for backend {backend!r} at precision {precision!r} "
            f"(no [{backend}.{precision}] table); available: {available}"
        ) from None


def parse_tolerances(doc: dict[str, Any], source: str) -> dict[tuple[str, str], Tolerances]:
    """Validate a parsed tolerances document; returns its tolerances per ``(backend, precision)``.

    Args:
        doc: the TOML document, as ``tomllib`` returns it.
        source: the file name, used in messages.

    Raises:
        ConfigError: unknown or missing keys, wrong types, negative or non-finite numbers, or a
            similarity minimum outside [0, 1].
    """
    out = {}
    for backend, precisions in doc.items():
        _expect_table(precisions, source, "", backend, "a table of precisions")
        for precision, sections in precisions.items():
            where = f"{backend}.{precision}"
            _expect_table(sections, source, backend, precision, "a table with [component] and [image]")
            for key in sections:
                if key not in _SECTIONS:
                    raise _error(source, where, key, f"unknown key; expected one of: {', '.join(_SECTIONS)}")
            for key in _SECTIONS:
                if key not in sections:
                    raise _error(source, where, key, "missing table")
                _expect_table(sections[key], source, where, key, "a table")
            defaults, overrides = _component(sections["component"], source, f"{where}.component")
            image = ImageTolerance(**_limits(sections["image"], _IMAGE_KEYS, source, f"{where}.image"))
            out[(backend, precision)] = Tolerances(backend, precision, defaults, image, overrides, source)
    return out


def _component(table: dict[str, Any], source: str, where: str) -> tuple[TensorTolerance, dict[str, TensorTolerance]]:
    """Split a [*.component] table into its defaults and the merged per-component overrides."""
    # Sub-tables are per-component overrides; everything else must be a limit.
    subtables = {k: v for k, v in table.items() if isinstance(v, dict) and k not in _TENSOR_KEYS}
    defaults = TensorTolerance(**_limits({k: v for k, v in table.items() if k not in subtables}, _TENSOR_KEYS, source, where))
    overrides = {
        name: replace(defaults, **_limits(sub, _TENSOR_KEYS, source, f"{where}.{name}"))
        for name, sub in subtables.items()
    }
    return defaults, overrides


def _limits(table: dict[str, Any], keys: tuple[str, ...], source: str, where: str) -> dict[str, float]:
    """Validate the limits of one table; returns them as floats."""
    out = {}
    for key, value in table.items():
        if key not in keys:
            raise _error(source, where, key, f"unknown key; expected one of: {', '.join(keys)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(source, where, key, f"expected a number, got {_type_name(value)} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise _error(source, where, key, f"must be a finite number, got {value}")
        if value < 0:
            raise _error(source, where, key, f"must not be negative, got {value}")
        if key in _UNIT_KEYS and value > 1:
            raise _error(source, where, key, f"must be between 0 and 1, got {value}")
        out[key] = value
    return out


def _expect_table(value: Any, source: str, where: str, key: str, what: str) -> None:
    if not isinstance(value, dict):
        raise _error(source, where, key, f"expected {what}, got {_type_name(value)} {value!r}")


def _error(source: str, where: str, key: str, problem: str) -> ConfigError:
    table = f"[{where}]" if where else "top level"
    return ConfigError(f"{source}: {table}, key {key!r}: {problem}")


def _type_name(value: Any) -> str:
    return _TOML_TYPES.get(type(value), type(value).__name__)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{file}: cannot read the tolerances file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: invalid TOML: {e}") from None


#: Shape-profile presets shipped with diffship (``-o profile=NAME`` of engine backends).
BUNDLED_SHAPE_PROFILES = Path(__file__).with_name("shape_profiles.toml")


def load_shape_presets(path: Path | None = None) -> dict[str, dict[str, list]]:
    """The shape-profile presets, validated: ``{name: {"batch": [min, max], "size": [min, max]}}``.

    Raises:
        ConfigError: naming the file, table and key of anything invalid.
    """
    file = Path(path) if path is not None else BUNDLED_SHAPE_PROFILES
    doc = _read_toml(file)
    source = str(file)
    presets = {}
    for name, table in doc.items():
        _expect_table(table, source, "", name, "a table with batch and size")
        for key in table:
            if key not in ("batch", "size"):
                raise _error(source, name, key, "unknown key; expected one of: batch, size")
        for key in ("batch", "size"):
            if key not in table:
                raise _error(source, name, key, "missing key")
            value = table[key]
            if not (isinstance(value, list) and len(value) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise _error(source, name, key, f"expected [min, max] numbers, got {value!r}")
            if not 0 < value[0] <= value[1] or not all(math.isfinite(v) for v in value):
                raise _error(source, name, key, f"expected 0 < min <= max, got {value!r}")
        if not all(isinstance(v, int) for v in table["batch"]):
            raise _error(source, name, "batch", f"expected whole numbers, got {table['batch']!r}")
        if not table["size"][0] <= 1 <= table["size"][1]:
            raise _error(source, name, "size", f"the export's own size (1.0) must lie in [min, max], got {table['size']!r}")
        if name == "static":
            raise _error(source, "", name, "'static' is built in (the export's exact size); choose another name")
        presets[name] = {"batch": list(table["batch"]), "size": [float(v) for v in table["size"]]}
    return presets

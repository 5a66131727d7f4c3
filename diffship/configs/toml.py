"""Reading the bundled TOML files, and the message style of their validation errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from diffship.errors import ConfigError

_TOML_TYPES = {str: "string", bool: "boolean", dict: "table", list: "array", int: "integer", float: "float"}


def read_toml(file: Path, what: str = "configuration") -> dict[str, Any]:
    """A TOML file as a dict; :class:`ConfigError` naming the file when it cannot be read or parsed."""
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{file}: cannot read the {what} file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: invalid TOML: {e}") from None


def expect_table(value: Any, source: str, where: str, key: str, what: str) -> None:
    if not isinstance(value, dict):
        raise table_error(source, where, key, f"expected {what}, got {type_name(value)} {value!r}")


def table_error(source: str, where: str, key: str, problem: str) -> ConfigError:
    """``FILE: [table], key 'k': problem``."""
    table = f"[{where}]" if where else "top level"
    return ConfigError(f"{source}: {table}, key {key!r}: {problem}")


def type_name(value: Any) -> str:
    return _TOML_TYPES.get(type(value), type(value).__name__)

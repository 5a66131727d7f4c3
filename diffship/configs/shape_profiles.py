"""Shape-profile presets (``-o profile=NAME`` of engine backends), from ``shape_profiles.toml``."""

from __future__ import annotations

import math
from pathlib import Path

from diffship.configs.toml import expect_table, read_toml, table_error

#: Shape-profile presets shipped with diffship (``-o profile=NAME`` of engine backends).
BUNDLED_SHAPE_PROFILES = Path(__file__).with_name("shape_profiles.toml")


def load_shape_presets(path: Path | None = None) -> dict[str, dict[str, list]]:
    """The shape-profile presets, validated: ``{name: {"batch": [min, max], "size": [min, max]}}``.

    Raises:
        ConfigError: naming the file, table and key of anything invalid.
    """
    file = Path(path) if path is not None else BUNDLED_SHAPE_PROFILES
    doc = read_toml(file, "shape profiles")
    source = str(file)
    presets = {}
    for name, table in doc.items():
        expect_table(table, source, "", name, "a table with batch and size")
        for key in table:
            if key not in ("batch", "size"):
                raise table_error(source, name, key, "unknown key; expected one of: batch, size")
        for key in ("batch", "size"):
            if key not in table:
                raise table_error(source, name, key, "missing key")
            value = table[key]
            if not (isinstance(value, list) and len(value) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise table_error(source, name, key, f"expected [min, max] numbers, got {value!r}")
            if not 0 < value[0] <= value[1] or not all(math.isfinite(v) for v in value):
                raise table_error(source, name, key, f"expected 0 < min <= max, got {value!r}")
        if not all(isinstance(v, int) for v in table["batch"]):
            raise table_error(source, name, "batch", f"expected whole numbers, got {table['batch']!r}")
        if not table["size"][0] <= 1 <= table["size"][1]:
            raise table_error(source, name, "size", f"the export's own size (1.0) must lie in [min, max], got {table['size']!r}")
        if name == "static":
            raise table_error(source, "", name, "'static' is built in (the export's exact size); choose another name")
        presets[name] = {"batch": list(table["batch"]), "size": [float(v) for v in table["size"]]}
    return presets

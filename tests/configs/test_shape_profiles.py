"""Loading and validating shape_profiles.toml (the engine shape-profile presets)."""

from __future__ import annotations

import pytest

from diffship.configs import load_shape_presets
from diffship.errors import ConfigError


def test_bundled_presets_load():
    presets = load_shape_presets()
    assert presets["dynamic"] == {"batch": [1, 4], "size": [0.5, 2.0]}


@pytest.mark.parametrize("text, message", [
    ("[wide]\nbatch = [1, 4]\n", r"\[wide\], key 'size': missing key"),
    ("[wide]\nbatch = [1, 4]\nsize = [0.5, 2.0]\nheight = 3\n", r"key 'height': unknown key"),
    ("[wide]\nbatch = [4, 1]\nsize = [0.5, 2.0]\n", r"key 'batch': expected 0 < min <= max"),
    ("[wide]\nbatch = [1.5, 4]\nsize = [0.5, 2.0]\n", r"key 'batch': expected whole numbers"),
    ("[wide]\nbatch = [1, 4]\nsize = [1.5, 2.0]\n", r"key 'size': the export's own size \(1.0\) must lie in"),
    ("[wide]\nbatch = [1, 4]\nsize = \"big\"\n", r"key 'size': expected \[min, max\] numbers"),
    ("[static]\nbatch = [1, 4]\nsize = [0.5, 2.0]\n", r"'static' is built in"),
    ("wide = 3\n", r"key 'wide': expected a table with batch and size"),
])
def test_invalid_presets_name_file_table_and_key(tmp_path, text, message):
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_shape_presets(path)

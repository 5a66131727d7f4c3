"""Bundled configuration data and its validation: the leaf of diffship's layers (imports nothing above it).

* :mod:`~diffship.configs.tolerances` -- parity tolerances per backend x precision (``tolerances.toml``);
* :mod:`~diffship.configs.shape_profiles` -- engine shape-profile presets (``shape_profiles.toml``);
* :mod:`~diffship.configs.bench_presets` -- benchmark settings and presets (``bench_presets.toml``);
* :mod:`~diffship.configs.fields` -- the one parser of typed records (options, settings, manifests);
* :mod:`~diffship.configs.toml` -- reading TOML files, with errors naming file, table and key.
"""

from diffship.configs.bench_presets import BenchSettings, load_presets, preset
from diffship.configs.shape_profiles import BUNDLED_SHAPE_PROFILES, load_shape_presets
from diffship.configs.tolerances import (BUNDLED_TOLERANCES, ImageTolerance, TensorTolerance, Tolerances, between,
                                         load_tolerances, parse_tolerances)

__all__ = ["BUNDLED_SHAPE_PROFILES", "BUNDLED_TOLERANCES", "BenchSettings", "ImageTolerance", "TensorTolerance",
           "Tolerances", "between", "load_presets", "load_shape_presets", "load_tolerances", "parse_tolerances", "preset"]

"""Parity tolerances per backend x precision: the records, and the loader of ``tolerances.toml``.

``tolerances.toml`` (shipped as package data next to this module) holds the parity tolerances per
backend and precision; its comments document every key. :func:`load_tolerances` reads it, or a user
file with the same layout, and raises :class:`~diffship.errors.ConfigError` naming the file, the table
and the key for anything it does not understand, so a typo never silently disables a check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from diffship.configs.toml import expect_table, read_toml, table_error, type_name
from diffship.errors import ConfigError


@dataclass(frozen=True)
class TensorTolerance:
    """Limits for one component output; a field that is ``None`` is not checked.

    Attributes:
        max_abs: largest allowed absolute error.
        mean_abs: largest allowed mean absolute error.
        p99_abs: largest allowed 99th percentile of the absolute error.
        cosine_min: smallest allowed cosine similarity, in [0, 1].
        psnr_min: smallest allowed PSNR, in dB.
    """

    max_abs: float | None = None
    mean_abs: float | None = None
    p99_abs: float | None = None
    cosine_min: float | None = None
    psnr_min: float | None = None


@dataclass(frozen=True)
class ImageTolerance:
    """Limits for one final image; a field that is ``None`` is not checked.

    Attributes:
        psnr_min: smallest allowed PSNR in dB (data range 1.0).
        ssim_min: smallest allowed mean SSIM, in [0, 1].
        max_abs: largest allowed absolute pixel difference (pixels in [0, 1]).
    """

    psnr_min: float | None = None
    ssim_min: float | None = None
    max_abs: float | None = None


@dataclass
class Tolerances:
    """All tolerances of one backend x precision, as loaded by :func:`diffship.configs.load_tolerances`.

    Attributes:
        backend: backend name, e.g. ``"onnx"``.
        precision: export precision, e.g. ``"fp16"``.
        component: default limits for every component output.
        image: limits for the final images.
        overrides: per component name, the defaults with that component's own keys merged over them.
        source: the file the tolerances were read from (for messages).
    """

    backend: str
    precision: str
    component: TensorTolerance
    image: ImageTolerance
    overrides: dict[str, TensorTolerance] = field(default_factory=dict)
    source: str = ""

    def for_component(self, name: str) -> TensorTolerance:
        """Return the limits for component ``name`` (its override if any, else the defaults)."""
        return self.overrides.get(name, self.component)



def between(a: Tolerances, b: Tolerances) -> Tolerances:
    """Limits for comparing two exports with each other, each judged against eager by ``a`` and ``b``.

    Each export may sit at its limit on either side of the eager output, so the bounds add up: absolute
    errors add, angles add (cosine), the dissimilarities ``1 - SSIM`` add, and the noise of the
    difference can reach 4x the larger noise (PSNR: the lower limit less 6 dB). A key either side leaves
    unchecked stays unchecked.
    """
    def add(x, y):
        return None if x is None or y is None else x + y

    def psnr(x, y):
        return None if x is None or y is None else min(x, y) - 6.0

    def cosine(x, y):
        if x is None or y is None:
            return None
        angle = math.acos(max(-1.0, min(1.0, x))) + math.acos(max(-1.0, min(1.0, y)))
        return math.cos(min(angle, math.pi))

    def tensor(x: TensorTolerance, y: TensorTolerance) -> TensorTolerance:
        return TensorTolerance(max_abs=add(x.max_abs, y.max_abs), mean_abs=add(x.mean_abs, y.mean_abs),
                               p99_abs=add(x.p99_abs, y.p99_abs), cosine_min=cosine(x.cosine_min, y.cosine_min),
                               psnr_min=psnr(x.psnr_min, y.psnr_min))

    ssim = None if a.image.ssim_min is None or b.image.ssim_min is None else a.image.ssim_min + b.image.ssim_min - 1
    return Tolerances(
        backend=f"{a.backend}|{b.backend}", precision=f"{a.precision}|{b.precision}",
        component=tensor(a.component, b.component),
        image=ImageTolerance(psnr_min=psnr(a.image.psnr_min, b.image.psnr_min), ssim_min=ssim,
                             max_abs=add(a.image.max_abs, b.image.max_abs)),
        overrides={n: tensor(a.for_component(n), b.for_component(n)) for n in {*a.overrides, *b.overrides}},
        source=" + ".join(dict.fromkeys((a.source, b.source))),
    )


#: The tolerances shipped with diffship.
BUNDLED_TOLERANCES = Path(__file__).with_name("tolerances.toml")

_SECTIONS = ("component", "image")
_TENSOR_KEYS = tuple(f.name for f in fields(TensorTolerance))
_IMAGE_KEYS = tuple(f.name for f in fields(ImageTolerance))
# Similarity scores are at most 1, so a larger minimum could never pass.
_UNIT_KEYS = frozenset({"cosine_min", "ssim_min"})


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
    table = parse_tolerances(read_toml(file, "tolerances"), str(file))
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
        expect_table(precisions, source, "", backend, "a table of precisions")
        for precision, sections in precisions.items():
            where = f"{backend}.{precision}"
            expect_table(sections, source, backend, precision, "a table with [component] and [image]")
            for key in sections:
                if key not in _SECTIONS:
                    raise table_error(source, where, key, f"unknown key; expected one of: {', '.join(_SECTIONS)}")
            for key in _SECTIONS:
                if key not in sections:
                    raise table_error(source, where, key, "missing table")
                expect_table(sections[key], source, where, key, "a table")
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
            raise table_error(source, where, key, f"unknown key; expected one of: {', '.join(keys)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise table_error(source, where, key, f"expected a number, got {type_name(value)} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise table_error(source, where, key, f"must be a finite number, got {value}")
        if value < 0:
            raise table_error(source, where, key, f"must not be negative, got {value}")
        if key in _UNIT_KEYS and value > 1:
            raise table_error(source, where, key, f"must be between 0 and 1, got {value}")
        out[key] = value
    return out


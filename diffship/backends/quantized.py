"""``full-int8``: the precision whose denoiser has 8-bit weights *and* activations on its convolutions and
matrix products (ONNX Runtime's static QDQ quantization, NNCF's on OpenVINO), and the ``keep_float``
export option both exporters take. What it does is in :mod:`diffship.exporters.quantization`."""

from __future__ import annotations

from typing import Any

from diffship.configs.fields import comma_list, option
from diffship.errors import OptionError

FULL_INT8 = "full-int8"
#: the layer groups measured for keeping float (see :mod:`diffship.exporters.quantization`).
GROUPS = ("ends", "time-embedding", "attention-scores")


def normalize_keep_float(value: Any) -> str:
    """``-o keep_float=`` as ``auto`` (measure), ``none`` (quantize every group) or a comma list of
    :data:`GROUPS`, in that order.

    Raises:
        OptionError: an unknown group, or ``auto``/``none`` mixed with groups.
    """
    names = comma_list(value)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise OptionError(f"keep_float must be auto, none or a comma list of: {', '.join(GROUPS)}; got {value!r}")
    if names in (["auto"], ["none"]):
        return names[0]
    if unknown := [n for n in names if n not in GROUPS]:
        raise OptionError(f"unknown keep_float group(s) {', '.join(unknown)}; choose auto, none or from: "
                          f"{', '.join(GROUPS)}")
    return ",".join(g for g in GROUPS if g in names) or "none"


def kept_groups(value: str) -> tuple[str, ...] | None:
    """The groups a normalized ``keep_float`` names; None for ``auto`` (measure them)."""
    return None if value == "auto" else () if value == "none" else tuple(value.split(","))


def keep_float_option() -> Any:
    """The ``keep_float`` field of an export options record."""
    return option("auto", normalize=normalize_keep_float)

"""``full-int8``: the precision whose denoiser (and VAE decoder, where it passes) has 8-bit weights *and*
activations on its convolutions and matrix products (ONNX Runtime's static QDQ quantization, NNCF's on
OpenVINO), and the ``keep_float`` export option both exporters take. What it does is in :mod:`diffship.exporters.quantization`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffship.configs.fields import comma_list, option
from diffship.errors import OptionError

FULL_INT8 = "full-int8"
#: ``keep_float``'s name for keeping the whole VAE decoder float (else quantized where it passes).
DECODER = "vae-decoder"
#: a component other than the denoiser (the VAE decoder) keeps 8-bit activations only where its images
#: reach this PSNR against the float graph's: an error of at most a third of what an image at 35 dB
#: (``tune``'s default floor) may carry in all, leaving the rest to the denoiser.
MIN_PASSING_DB = 40.0
#: the decoder's images are judged as the pipeline shows them: clipped to [-1, 1], peak 2 (the range),
#: not by its raw outputs' range (toy VAEs' outputs span several units, and a 35 dB output was a 25 dB image).
IMAGE_RANGE = (-1.0, 1.0)
#: the layer groups measured for keeping float (see :mod:`diffship.exporters.quantization`).
GROUPS = ("ends", "time-embedding", "attention-scores")
#: what ``keep_float`` may name: the layer groups and the whole VAE decoder.
KEEP_FLOAT = (*GROUPS, DECODER)


def normalize_groups(value: Any, name: str, allowed: tuple[str, ...], words: tuple[str, ...]) -> str:
    """An option naming layer groups (``-o NAME=``) as one of ``words`` (``auto``, ``none``) or a comma list
    of ``allowed``, in that order.

    Raises:
        OptionError: an unknown group, or a word mixed with groups.
    """
    names = comma_list(value)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise OptionError(f"{name} must be {', '.join(words)} or a comma list of: {', '.join(allowed)}; got {value!r}")
    if len(names) == 1 and names[0] in words:
        return names[0]
    if unknown := [n for n in names if n not in allowed]:
        raise OptionError(f"unknown {name} group(s) {', '.join(unknown)}; choose {', '.join(words)} or from: "
                          f"{', '.join(allowed)}")
    return ",".join(g for g in allowed if g in names) or "none"


def normalize_keep_float(value: Any) -> str:
    """``-o keep_float=`` as ``auto`` (measure), ``none`` (quantize every group) or a comma list of
    :data:`KEEP_FLOAT` (see :func:`normalize_groups`)."""
    return normalize_groups(value, "keep_float", KEEP_FLOAT, ("auto", "none"))


def kept_groups(value: str) -> tuple[str, ...] | None:
    """The groups a normalized ``keep_float`` names; None for ``auto`` (measure them)."""
    return None if value == "auto" else () if value == "none" else tuple(value.split(","))


def quantizes(spec: Any, keep: tuple[str, ...] | None) -> bool:
    """Whether ``full-int8`` gives ``spec``'s component (a ``ComponentSpec``) 8-bit activations, given the
    kept groups (:func:`kept_groups`): the denoiser always, the VAE decoder unless kept float."""
    return spec.denoiser or (spec.int8_activations and DECODER not in (keep or ()))


@dataclass(frozen=True)
class Floor:
    """What a quantized component other than the denoiser must reach to keep its 8-bit activations.

    Attributes:
        db: the PSNR (dB) of its outputs against the float graph's.
        value_range: the outputs are clipped to this range before comparing, and it is the peak.
    """

    db: float
    value_range: tuple[float, float]


def floor_for(spec: Any, keep: tuple[str, ...] | None) -> Floor | None:
    """What ``spec``'s quantized component must reach, or None: the VAE decoder, where measured
    (``keep_float=auto``; :data:`MIN_PASSING_DB` on its images); the denoiser never (see
    :mod:`diffship.exporters.quantization`)."""
    return Floor(MIN_PASSING_DB, IMAGE_RANGE) if keep is None and not spec.denoiser else None


def keep_float_option() -> Any:
    """The ``keep_float`` field of an export options record."""
    return option("auto", normalize=normalize_keep_float)

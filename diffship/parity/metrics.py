"""Numeric parity metrics (eager PyTorch vs. exported model) and the tolerance checks that judge them.

Two kinds of comparison:

* :func:`tensor_metrics` compares one output tensor of one component (``unet/out_sample``) and
  :func:`check_tensor` judges it against a :class:`TensorTolerance`;
* :func:`image_metrics` compares two final pipeline images and :func:`check_image` judges them
  against an :class:`ImageTolerance`.

Metric field names are part of the parity report's JSON schema (see :mod:`diffship.parity.result`),
so their definitions are documented on the dataclasses and must not change within a schema version.
This module needs numpy only; torch tensors are accepted by duck typing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffship.configs.tolerances import ImageTolerance, TensorTolerance
from diffship.errors import ShapeError

#: A bound is either an upper limit ("value <= limit") or a lower limit ("value >= limit").
MAX = "max"
MIN = "min"

#: (metric field, tolerance field, bound) for every checked metric; reports use the same tables
#: for their columns so a report never shows a metric the check ignores, or the reverse.
TENSOR_LIMITS: tuple[tuple[str, str, str], ...] = (
    ("max_abs", "max_abs", MAX),
    ("mean_abs", "mean_abs", MAX),
    ("p99_abs", "p99_abs", MAX),
    ("cosine", "cosine_min", MIN),
    ("psnr", "psnr_min", MIN),
)
IMAGE_LIMITS: tuple[tuple[str, str, str], ...] = (
    ("psnr", "psnr_min", MIN),
    ("ssim", "ssim_min", MIN),
    ("max_abs", "max_abs", MAX),
)

# SSIM constants of Wang et al. (2004), the values every common implementation defaults to.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


@dataclass(frozen=True)
class TensorMetrics:
    """How far an exported output is from the eager one; computed in float64.

    With ``e`` the eager (expected) and ``a`` the exported (actual) tensor, over the positions where
    both are finite:

    Attributes:
        max_abs: ``max |a - e|``.
        mean_abs: ``mean |a - e|``.
        p99_abs: 99th percentile of ``|a - e|`` (linear interpolation, ``numpy.percentile``).
        max_rel: ``max rel``, with ``rel = |a - e| / max(|e|, eps)`` and ``eps = 1e-6 * max|e|``:
            the floor keeps near-zero expected values from blowing the ratio up; if ``e`` is all zeros
            the denominator is 1 (``rel`` equals the absolute error).
        mean_rel: ``mean rel``.
        p99_rel: 99th percentile of ``rel``.
        cosine: cosine similarity of the flattened tensors; 1.0 if both are all zeros, 0.0 if only one is.
        psnr: ``20 * log10(range / rmse)`` in dB, with ``range = max(e) - min(e)`` (``max|e|`` if that is 0,
            and 1.0 if that is 0 too); ``inf`` when ``rmse`` is 0.
        nonfinite_expected: number of NaN/Inf elements in ``e`` (over all positions).
        nonfinite_actual: number of NaN/Inf elements in ``a`` (over all positions).
        shape_expected: shape of ``e``.
        shape_actual: shape of ``a``.

    When the shapes differ nothing is compared: errors are ``inf``, ``cosine`` is ``nan`` and ``psnr`` is
    ``-inf``. When no position is finite in both (but there are positions), every statistic is ``nan``.
    """

    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    cosine: float
    psnr: float
    nonfinite_expected: int
    nonfinite_actual: int
    shape_expected: tuple[int, ...]
    shape_actual: tuple[int, ...]


@dataclass(frozen=True)
class ImageMetrics:
    """How far an exported pipeline's image is from the eager one (pixels as floats in [0, 1]).

    Attributes:
        psnr: ``10 * log10(1 / mse)`` in dB (data range 1.0) over positions finite in both; ``inf`` if equal.
        ssim: mean SSIM (Wang et al. 2004): Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03,
            data range 1.0, population (not sample) statistics, computed per channel and averaged. The
            Gaussian filter is applied in 'valid' mode (only windows fully inside the image), which equals
            scikit-image's ``structural_similarity(..., gaussian_weights=True,
            use_sample_covariance=False, data_range=1.0)``. Images smaller than 11 px shrink the window to
            the smaller side. Non-finite pixels count as 0 here.
        max_abs: ``max |a - e|`` over positions finite in both.
        mean_abs: ``mean |a - e|`` over positions finite in both.
        nonfinite_expected: number of NaN/Inf values in the eager image.
        nonfinite_actual: number of NaN/Inf values in the exported image.
        shape_expected: shape of the eager image (H, W, C).
        shape_actual: shape of the exported image (H, W, C).

    Different shapes give ``psnr = -inf``, ``ssim = nan`` and infinite errors, as for tensors.
    """

    psnr: float
    ssim: float
    max_abs: float
    mean_abs: float
    nonfinite_expected: int
    nonfinite_actual: int
    shape_expected: tuple[int, ...]
    shape_actual: tuple[int, ...]

    @property
    def nonfinite(self) -> int:
        """NaN/Inf values in both images together."""
        return self.nonfinite_expected + self.nonfinite_actual


def tensor_metrics(expected: Any, actual: Any) -> TensorMetrics:
    """Compare an exported output (``actual``) with the eager one (``expected``).

    Args:
        expected: eager PyTorch output, numpy array or torch tensor (any dtype, any device).
        actual: exported model's output, same kinds.

    Returns:
        The metrics, as defined on :class:`TensorMetrics`. Never raises on mismatching shapes or
        non-finite values: those show as metrics, and :func:`check_tensor` fails them.
    """
    e, a = _float64(expected), _float64(actual)
    counts = _counts(e, a)
    if e.shape != a.shape:
        return TensorMetrics(
            max_abs=math.inf, mean_abs=math.inf, p99_abs=math.inf,
            max_rel=math.inf, mean_rel=math.inf, p99_rel=math.inf,
            cosine=math.nan, psnr=-math.inf, **counts,
        )  # fmt: skip
    e, a = _finite_pairs(e, a)
    if e.size == 0:
        # Nothing comparable: an empty tensor is trivially equal, an all-non-finite one is unknown.
        empty = math.prod(counts["shape_expected"]) == 0
        err, cos, psnr = (0.0, 1.0, math.inf) if empty else (math.nan, math.nan, math.nan)
        return TensorMetrics(err, err, err, err, err, err, cos, psnr, **counts)
    diff = np.abs(a - e)
    mag = np.abs(e)
    eps = 1e-6 * float(mag.max())
    rel = diff / np.maximum(mag, eps) if eps > 0 else diff
    return TensorMetrics(
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        p99_abs=float(np.percentile(diff, 99)),
        max_rel=float(rel.max()),
        mean_rel=float(rel.mean()),
        p99_rel=float(np.percentile(rel, 99)),
        cosine=_cosine(e, a),
        psnr=_psnr(_data_range(e), diff),
        **counts,
    )


def image_metrics(expected: Any, actual: Any) -> ImageMetrics:
    """Compare an exported pipeline's image (``actual``) with the eager one (``expected``).

    Args:
        expected: eager image, H x W x C (or H x W) floats in [0, 1], or uint8 (scaled by 1/255).
        actual: exported image, same kinds.

    Returns:
        The metrics, as defined on :class:`ImageMetrics`.
    """
    e, a = as_image(expected), as_image(actual)
    counts = _counts(e, a)
    if e.shape != a.shape:
        return ImageMetrics(psnr=-math.inf, ssim=math.nan, max_abs=math.inf, mean_abs=math.inf, **counts)
    fe, fa = _finite_pairs(e, a)
    if fe.size == 0:
        return ImageMetrics(psnr=math.nan, ssim=math.nan, max_abs=math.nan, mean_abs=math.nan, **counts)
    diff = np.abs(fa - fe)
    return ImageMetrics(
        psnr=_psnr(1.0, diff),
        ssim=ssim(np.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0), np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        **counts,
    )


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM of two H x W x C float images, as documented on :attr:`ImageMetrics.ssim`."""
    n = min(SSIM_WINDOW, x.shape[0], x.shape[1])
    if n == 0:
        return math.nan
    r = np.arange(n) - (n - 1) / 2
    g = np.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    g /= g.sum()
    mx, my = _gaussian_valid(x, g), _gaussian_valid(y, g)
    vx = _gaussian_valid(x * x, g) - mx * mx
    vy = _gaussian_valid(y * y, g) - my * my
    cxy = _gaussian_valid(x * y, g) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean(axis=(0, 1)).mean())


def check_tensor(m: TensorMetrics, tol: TensorTolerance) -> list[str]:
    """Judge one output's metrics; returns the failures (empty when it passes).

    Non-finite values and mismatching shapes always fail; a tolerance field that is ``None`` is not
    checked. With mismatching shapes the other metrics are meaningless and are not reported.
    """
    return _check(m, tol, TENSOR_LIMITS, "output")


def check_image(m: ImageMetrics, tol: ImageTolerance) -> list[str]:
    """Judge one image's metrics; returns the failures (empty when it passes), as :func:`check_tensor`."""
    return _check(m, tol, IMAGE_LIMITS, "image")


def within_limit(value: float, limit: float | None, bound: str) -> bool:
    """Whether ``value`` satisfies ``limit`` (``None`` always does); ``nan`` never does."""
    if limit is None:
        return True
    return bool(value <= limit) if bound == MAX else bool(value >= limit)


def format_pair(name: str, value: float, limit: float | None) -> tuple[str, str]:
    """Format a metric and its limit with the fewest digits that still tell them apart.

    Errors use 2 significant digits (``2.1e-03``), similarities 4 decimals (``0.9812``), PSNR 1 decimal
    with its unit (``31.2 dB``); more digits are used when the limit needs them (``0.99999``) or when the
    value would otherwise print like the limit, or like 1 for a similarity.

    Returns:
        ``(value, limit)`` strings; the limit string is empty when ``limit`` is None.
    """
    kind = _KINDS.get(name, "error")
    code, lo, hi, unit = _STYLES[kind]
    # The limit must print exactly and the value must not print like it; a similarity below 1 must
    # not print like a perfect 1 either.
    refs = [r for r in (limit, 1.0 if kind == "similarity" else None) if r is not None]
    for digits in range(lo, hi + 1):
        text = f"{value:.{digits}{code}}"
        shown = [f"{r:.{digits}{code}}" for r in refs]
        if all(float(s) == r and (value == r or text != s) for r, s in zip(refs, shown)):
            break
    return text + unit, "" if limit is None else f"{limit:.{digits}{code}}{unit}"


def as_image(image: Any) -> np.ndarray:
    """Return ``image`` as an H x W x C float64 array: uint8 is scaled to [0, 1], H x W gains a channel axis."""
    arr = np.asarray(image)
    scale = 1 / 255 if arr.dtype == np.uint8 else 1.0
    arr = arr.astype(np.float64) * scale
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ShapeError(f"an image must be H x W x C or H x W, got shape {arr.shape}")
    return arr


# Metric name -> display style; (format code, min digits, max digits, unit) per style.
_KINDS = {"cosine": "similarity", "ssim": "similarity", "psnr": "db"}
_STYLES = {"error": ("e", 1, 4, ""), "similarity": ("f", 4, 10, ""), "db": ("f", 1, 4, " dB")}


def _check(m: TensorMetrics | ImageMetrics, tol: Any, limits: tuple[tuple[str, str, str], ...], noun: str) -> list[str]:
    failures = []
    shapes_differ = m.shape_expected != m.shape_actual
    if shapes_differ:
        failures.append(f"shape {m.shape_actual} != expected {m.shape_expected}")
    for count, side in ((m.nonfinite_actual, "export's"), (m.nonfinite_expected, "eager (PyTorch)")):
        if count:
            failures.append(f"{count} non-finite value{'s' if count != 1 else ''} in the {side} {noun}")
    if shapes_differ:
        return failures
    for metric, key, bound in limits:
        limit, value = getattr(tol, key), getattr(m, metric)
        if not within_limit(value, limit, bound):
            shown, shown_limit = format_pair(metric, value, limit)
            failures.append(f"{metric} {shown} {'>' if bound == MAX else '<'} {shown_limit}")
    return failures


def _float64(x: Any) -> np.ndarray:
    # Duck-typed torch support keeps this module importable (and fast to import) without torch.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _counts(e: np.ndarray, a: np.ndarray) -> dict[str, Any]:
    return {
        "nonfinite_expected": int(e.size - np.count_nonzero(np.isfinite(e))),
        "nonfinite_actual": int(a.size - np.count_nonzero(np.isfinite(a))),
        "shape_expected": tuple(int(d) for d in e.shape),
        "shape_actual": tuple(int(d) for d in a.shape),
    }


def _finite_pairs(e: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened values at the positions where both arrays are finite."""
    mask = np.isfinite(e) & np.isfinite(a)
    if mask.all():
        return e.ravel(), a.ravel()
    return e[mask], a[mask]


def _cosine(e: np.ndarray, a: np.ndarray) -> float:
    ne, na = float(np.linalg.norm(e)), float(np.linalg.norm(a))
    if ne == 0 or na == 0:
        return 1.0 if ne == na else 0.0
    return float(np.clip(np.dot(e, a) / (ne * na), -1.0, 1.0))


def _data_range(e: np.ndarray) -> float:
    rng = float(e.max() - e.min())
    return rng or float(np.abs(e).max()) or 1.0


def _psnr(data_range: float, diff: np.ndarray) -> float:
    rmse = math.sqrt(float(np.mean(diff * diff)))
    return math.inf if rmse == 0 else 20 * math.log10(data_range / rmse)


def _gaussian_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over the first two axes, 'valid' mode (no padding).

    Shifted multiply-adds instead of a sliding-window view keep memory at a few image-sized arrays.
    """
    n = len(g)
    h, w = x.shape[0] - n + 1, x.shape[1] - n + 1
    rows = sum(g[k] * x[k : k + h] for k in range(n))
    return sum(g[k] * rows[:, k : k + w] for k in range(n))

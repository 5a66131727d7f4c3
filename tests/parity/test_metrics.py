"""Parity metrics and tolerance checks, on tiny arrays with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffship.parity.metrics import (
    ImageMetrics,
    ImageTolerance,
    TensorMetrics,
    TensorTolerance,
    check_image,
    check_tensor,
    format_pair,
    image_metrics,
    ssim,
    tensor_metrics,
)


def _tensor_metrics(**overrides) -> TensorMetrics:
    base = dict(
        max_abs=0.0, mean_abs=0.0, p99_abs=0.0, max_rel=0.0, mean_rel=0.0, p99_rel=0.0, cosine=1.0,
        psnr=math.inf, nonfinite_expected=0, nonfinite_actual=0, shape_expected=(2,), shape_actual=(2,),
    )  # fmt: skip
    return TensorMetrics(**{**base, **overrides})


def _image_metrics(**overrides) -> ImageMetrics:
    base = dict(
        psnr=math.inf, ssim=1.0, max_abs=0.0, mean_abs=0.0, nonfinite_expected=0, nonfinite_actual=0,
        shape_expected=(4, 4, 3), shape_actual=(4, 4, 3),
    )  # fmt: skip
    return ImageMetrics(**{**base, **overrides})


# --- tensor_metrics ----------------------------------------------------------------------------------


def test_tensor_metrics_hand_computed():
    m = tensor_metrics(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0, 3.5]))
    assert m.max_abs == 0.5
    assert m.mean_abs == 0.125
    assert m.p99_abs == pytest.approx(0.5 * 0.97)  # linear interpolation between 0 and 0.5 at 0.97 of the gap
    # rel at the last position: 0.5 / 3; eps = 3e-6 keeps the zeros at 0 / eps = 0.
    assert m.max_rel == pytest.approx(0.5 / 3)
    assert m.mean_rel == pytest.approx(0.5 / 3 / 4)
    assert m.psnr == pytest.approx(20 * math.log10(3 / 0.25))  # rmse = sqrt(0.25 / 4) = 0.25
    assert m.cosine == pytest.approx((0 + 1 + 4 + 10.5) / (math.sqrt(14) * math.sqrt(1 + 4 + 12.25)))
    assert (m.nonfinite_expected, m.nonfinite_actual) == (0, 0)
    assert m.shape_expected == m.shape_actual == (4,)


def test_tensor_metrics_identical_and_zero():
    x = np.arange(6.0).reshape(2, 3)
    m = tensor_metrics(x, x.copy())
    assert (m.max_abs, m.mean_abs, m.max_rel, m.cosine, m.psnr) == (0.0, 0.0, 0.0, 1.0, math.inf)
    zeros = tensor_metrics(np.zeros(4), np.zeros(4))
    assert zeros.cosine == 1.0 and zeros.psnr == math.inf
    # Expected all zero: rel falls back to the absolute error; PSNR range falls back to 1.0.
    m = tensor_metrics(np.zeros(4), np.array([0.0, 0.0, 0.0, 0.2]))
    assert m.max_rel == pytest.approx(0.2)
    assert m.cosine == 0.0
    assert m.psnr == pytest.approx(20 * math.log10(1.0 / 0.1))


def test_relative_error_floor_avoids_blowup_at_zero():
    m = tensor_metrics(np.array([0.0, 1000.0]), np.array([1e-3, 1000.0]))
    # eps = 1e-6 * 1000 = 1e-3, so the zero position gives 1e-3 / 1e-3 = 1, not 1e-3 / 0.
    assert m.max_rel == pytest.approx(1.0)


def test_psnr_range_falls_back_to_max_abs_for_constant_expected():
    m = tensor_metrics(np.full(4, 2.0), np.array([2.0, 2.0, 2.0, 3.0]))
    assert m.psnr == pytest.approx(20 * math.log10(2.0 / 0.5))


def test_tensor_metrics_accepts_torch_in_any_dtype():
    e = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float16)
    a = torch.tensor([[0.0, 1.0], [2.0, 3.5]], dtype=torch.bfloat16)
    m = tensor_metrics(e, a)
    assert m.max_abs == 0.5 and m.shape_expected == (2, 2)
    assert m == tensor_metrics(e.numpy(), a.float().numpy())


def test_nan_and_inf_are_counted_and_excluded_from_stats():
    e = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    a = np.array([1.0, 2.5, 3.0, np.inf, -np.inf])
    m = tensor_metrics(e, a)
    assert m.nonfinite_expected == 1
    assert m.nonfinite_actual == 2
    assert m.max_abs == 0.5  # over positions 0 and 1 only
    assert m.mean_abs == 0.25
    failures = check_tensor(m, TensorTolerance(max_abs=1.0))
    assert failures == ["2 non-finite values in the export's output", "1 non-finite value in the eager (PyTorch) output"]


def test_all_nonfinite_gives_nan_stats_that_fail():
    m = tensor_metrics(np.array([np.nan, np.nan]), np.array([1.0, 2.0]))
    assert math.isnan(m.max_abs) and math.isnan(m.cosine)
    failures = check_tensor(m, TensorTolerance(max_abs=1.0, cosine_min=0.5))
    assert "max_abs nan > 1.0e+00" in failures
    assert "cosine nan < 0.5000" in failures


def test_shape_mismatch_does_not_raise_and_fails():
    m = tensor_metrics(np.zeros((1, 4, 16, 16)), np.zeros((1, 4, 8, 8)))
    assert m.shape_expected == (1, 4, 16, 16) and m.shape_actual == (1, 4, 8, 8)
    assert m.max_abs == math.inf and math.isnan(m.cosine) and m.psnr == -math.inf
    # Only the shape is reported: the other metrics say nothing when nothing was compared.
    assert check_tensor(m, TensorTolerance(max_abs=1.0, cosine_min=0.9)) == [
        "shape (1, 4, 8, 8) != expected (1, 4, 16, 16)"
    ]


# --- checks ------------------------------------------------------------------------------------------


def test_check_tensor_messages():
    m = _tensor_metrics(max_abs=2.1e-3, mean_abs=1e-5, p99_abs=1e-3, cosine=0.9812, psnr=31.2)
    tol = TensorTolerance(max_abs=1e-4, mean_abs=1e-4, p99_abs=1e-4, cosine_min=0.999, psnr_min=40.0)
    assert check_tensor(m, tol) == [
        "max_abs 2.1e-03 > 1.0e-04",
        "p99_abs 1.0e-03 > 1.0e-04",
        "cosine 0.9812 < 0.9990",
        "psnr 31.2 dB < 40.0 dB",
    ]


def test_check_tensor_none_is_unchecked_and_limits_are_inclusive():
    m = _tensor_metrics(max_abs=1e9, cosine=-1.0, psnr=-5.0)
    assert check_tensor(m, TensorTolerance()) == []
    assert check_tensor(_tensor_metrics(max_abs=1e-4, cosine=0.999), TensorTolerance(max_abs=1e-4, cosine_min=0.999)) == []


def test_messages_use_enough_digits_to_differ():
    assert check_tensor(_tensor_metrics(max_abs=1.04e-4), TensorTolerance(max_abs=1e-4)) == ["max_abs 1.04e-04 > 1.00e-04"]
    assert check_tensor(_tensor_metrics(cosine=0.99998), TensorTolerance(cosine_min=0.99999)) == [
        "cosine 0.99998 < 0.99999"
    ]
    assert format_pair("cosine", 0.9999996, None) == ("0.9999996", "")
    assert format_pair("psnr", math.inf, 40.0) == ("inf dB", "40.0 dB")
    # Passing, yet below 1: not shown as a perfect 1.00000.
    assert format_pair("cosine", 0.999998, 0.99999) == ("0.999998", "0.999990")
    assert format_pair("cosine", 1.0, 0.99999) == ("1.00000", "0.99999")


def test_check_image_messages():
    m = _image_metrics(psnr=28.04, ssim=0.9, max_abs=0.5, nonfinite_actual=3)
    failures = check_image(m, ImageTolerance(psnr_min=30.0, ssim_min=0.95, max_abs=0.25))
    assert failures == [
        "3 non-finite values in the export's image",
        "psnr 28.0 dB < 30.0 dB",
        "ssim 0.9000 < 0.9500",
        "max_abs 5.0e-01 > 2.5e-01",
    ]
    assert check_image(_image_metrics(psnr=50.0, ssim=0.99), ImageTolerance(psnr_min=30.0, ssim_min=0.95)) == []


# --- images ------------------------------------------------------------------------------------------


@pytest.fixture
def image() -> np.ndarray:
    y, x = np.mgrid[0:24, 0:20] / 24.0
    return np.stack([x, y, 0.5 + 0.4 * np.sin(6 * x * y)], axis=-1)


def test_image_metrics_identical(image):
    m = image_metrics(image, image.copy())
    assert m.ssim == pytest.approx(1.0, abs=1e-12)
    assert m.psnr == math.inf and m.max_abs == 0.0 and m.nonfinite == 0


def test_image_psnr_and_errors_hand_computed():
    e = np.zeros((2, 2, 1))
    a = np.array([[0.0, 0.0], [0.0, 0.2]])[:, :, None]
    m = image_metrics(e, a)
    assert m.psnr == pytest.approx(10 * math.log10(1 / (0.04 / 4)))
    assert m.max_abs == pytest.approx(0.2) and m.mean_abs == pytest.approx(0.05)


def test_image_metrics_uint8_and_grayscale_inputs(image):
    as_uint8 = (image * 255).round().astype(np.uint8)
    m = image_metrics(as_uint8, as_uint8[:, :, 0:1].repeat(3, axis=2))
    assert m.shape_expected == (24, 20, 3)
    gray = image_metrics(image[:, :, 0], image[:, :, 0])
    assert gray.shape_expected == (24, 20, 1) and gray.ssim == pytest.approx(1.0)
    assert m.max_abs == pytest.approx(np.abs(as_uint8[..., 1:] / 255 - as_uint8[..., :1] / 255).max())


def test_ssim_decreases_with_noise(image):
    noise = np.random.default_rng(0).standard_normal(image.shape)
    values = [image_metrics(image, image + s * noise).ssim for s in (0.01, 0.03, 0.1)]
    assert all(v < 1.0 for v in values)
    assert values[0] > values[1] > values[2]


def test_ssim_of_constant_images_matches_closed_form():
    # Variances and covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01)^2.
    a, b = 0.5, 0.6
    value = ssim(np.full((16, 16, 3), a), np.full((16, 16, 3), b))
    assert value == pytest.approx((2 * a * b + 1e-4) / (a * a + b * b + 1e-4))


def _brute_force_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Direct 2-D windowed SSIM, independent of the separable filter, for cross-checking."""
    n = min(11, x.shape[0], x.shape[1])
    r = np.arange(n) - (n - 1) / 2
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    per_channel = []
    for c in range(x.shape[2]):
        values = []
        for i in range(x.shape[0] - n + 1):
            for j in range(x.shape[1] - n + 1):
                px, py = x[i : i + n, j : j + n, c], y[i : i + n, j : j + n, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(values))
    return float(np.mean(per_channel))


@pytest.mark.parametrize("shape", [(15, 13, 2), (6, 9, 3)])  # the second shrinks the window to 6
def test_ssim_matches_direct_windowed_computation(shape):
    rng = np.random.default_rng(1)
    x = rng.random(shape)
    y = np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1)
    assert ssim(x, y) == pytest.approx(_brute_force_ssim(x, y), rel=1e-10)


def test_ssim_matches_scikit_image_when_available(image):
    metrics = pytest.importorskip("skimage.metrics")
    noisy = np.clip(image + 0.05 * np.random.default_rng(2).standard_normal(image.shape), 0, 1)
    expected = metrics.structural_similarity(
        image, noisy, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert image_metrics(image, noisy).ssim == pytest.approx(expected, rel=1e-6)


def test_image_shape_mismatch_and_nonfinite(image):
    m = image_metrics(image, image[:-1])
    assert m.psnr == -math.inf and math.isnan(m.ssim)
    assert check_image(m, ImageTolerance(psnr_min=30.0)) == ["shape (23, 20, 3) != expected (24, 20, 3)"]
    broken = image.copy()
    broken[5, 5, 2] = np.nan
    m = image_metrics(image, broken)
    assert m.nonfinite_actual == 1 and m.nonfinite == 1
    # PSNR and errors skip the NaN position (the rest is equal); SSIM counts it as 0.
    assert m.psnr == math.inf and m.max_abs == 0.0
    assert 0.9 < m.ssim < 1.0
    assert check_image(m, ImageTolerance()) == ["1 non-finite value in the export's image"]

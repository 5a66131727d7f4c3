"""Loading and validating tolerances.toml (bundled and user files)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from diffship.configs import BUNDLED_TOLERANCES, load_tolerances, parse_tolerances
from diffship.errors import ConfigError
from diffship.configs import ImageTolerance, TensorTolerance

VALID = """
[onnx.fp32.component]
max_abs = 1e-4
cosine_min = 0.99999
psnr_min = 60

[onnx.fp32.component.vae_decoder]
max_abs = 1e-3
mean_abs = 1e-5

[onnx.fp32.image]
psnr_min = 40.0
ssim_min = 0.99
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tolerances.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_bundled_file_is_package_data_next_to_the_loader():
    import diffship.configs

    assert BUNDLED_TOLERANCES == Path(diffship.configs.__file__).parent / "tolerances.toml"
    assert BUNDLED_TOLERANCES.is_file()


def test_bundled_tolerances():
    fp32 = load_tolerances("onnx", "fp32")
    assert fp32.component == TensorTolerance(max_abs=1e-4, cosine_min=0.99999, psnr_min=60.0)
    assert fp32.image == ImageTolerance(psnr_min=40.0, ssim_min=0.99)
    assert fp32.source == str(BUNDLED_TOLERANCES)
    fp16 = load_tolerances("onnx", "fp16")
    assert fp16.component == TensorTolerance(max_abs=1e-2, cosine_min=0.9999, psnr_min=50.0)
    assert fp16.image == ImageTolerance(psnr_min=30.0, ssim_min=0.95)
    # Every table of the bundled file is valid, not only the two above.
    with open(BUNDLED_TOLERANCES, "rb") as f:
        assert set(parse_tolerances(tomllib.load(f), "bundled")) >= {("onnx", "fp32"), ("onnx", "fp16")}


def test_user_file_with_override_merged_over_defaults(tmp_path):
    tol = load_tolerances("onnx", "fp32", _write(tmp_path, VALID))
    assert tol.component == TensorTolerance(max_abs=1e-4, cosine_min=0.99999, psnr_min=60.0)
    assert tol.for_component("unet") == tol.component
    assert tol.for_component("vae_decoder") == TensorTolerance(
        max_abs=1e-3, mean_abs=1e-5, cosine_min=0.99999, psnr_min=60.0
    )
    assert isinstance(tol.component.psnr_min, float)  # the integer 60 is read as a float


@pytest.mark.parametrize(
    ("text", "table", "key", "problem"),
    [
        (VALID.replace("max_abs = 1e-4", "max_ab = 1e-4"), "[onnx.fp32.component]", "max_ab", "unknown key"),
        (VALID.replace("mean_abs = 1e-5", "mean_ab = 1e-5"), "[onnx.fp32.component.vae_decoder]", "mean_ab", "unknown key"),
        (VALID.replace("ssim_min = 0.99", "cosine_min = 0.99"), "[onnx.fp32.image]", "cosine_min", "unknown key"),
        (VALID + "\n[onnx.fp32.images]\npsnr_min = 1\n", "[onnx.fp32]", "images", "unknown key"),
        (VALID.replace("max_abs = 1e-4", 'max_abs = "1e-4"'), "[onnx.fp32.component]", "max_abs", "expected a number, got string"),
        (VALID.replace("psnr_min = 40.0", "psnr_min = true"), "[onnx.fp32.image]", "psnr_min", "expected a number, got boolean"),
        (VALID.replace("psnr_min = 40.0", "psnr_min = [40]"), "[onnx.fp32.image]", "psnr_min", "expected a number, got array"),
        (
            VALID.replace("max_abs = 1e-4\n", "") + "\n[onnx.fp32.component.max_abs]\nx = 1\n",
            "[onnx.fp32.component]", "max_abs", "expected a number, got table",
        ),
        (VALID + "\n[onnx.fp32.component.unet.max_abs]\nx = 1\n", "[onnx.fp32.component.unet]", "max_abs", "got table"),
        (VALID.replace("max_abs = 1e-3", "max_abs = -1e-3"), "[onnx.fp32.component.vae_decoder]", "max_abs", "must not be negative"),
        (VALID.replace("psnr_min = 60", "psnr_min = -1"), "[onnx.fp32.component]", "psnr_min", "must not be negative"),
        (VALID.replace("cosine_min = 0.99999", "cosine_min = 1.5"), "[onnx.fp32.component]", "cosine_min", "between 0 and 1"),
        (VALID.replace("ssim_min = 0.99", "ssim_min = 2"), "[onnx.fp32.image]", "ssim_min", "between 0 and 1"),
        (VALID.replace("max_abs = 1e-4", "max_abs = nan"), "[onnx.fp32.component]", "max_abs", "finite"),
        (VALID.replace("[onnx.fp32.image]\npsnr_min = 40.0\nssim_min = 0.99", ""), "[onnx.fp32]", "image", "missing table"),
        ("onnx = 1\n", "top level", "onnx", "expected a table of precisions, got integer"),
        ("[onnx]\nfp32 = 'x'\n", "[onnx]", "fp32", "expected a table"),
        (VALID + "\n[onnx.fp16]\ncomponent = 3\nimage = {}\n", "[onnx.fp16]", "component", "expected a table"),
    ],
)
def test_invalid_files_name_file_table_and_key(tmp_path, text, table, key, problem):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_tolerances("onnx", "fp32", path)
    message = str(info.value)
    assert str(path) in message
    assert table in message
    assert repr(key) in message
    if problem:
        assert problem in message


def test_nested_table_where_a_number_belongs(tmp_path):
    path = _write(tmp_path, VALID.replace("mean_abs = 1e-5", "mean_abs = 1e-5\n[onnx.fp32.component.vae_decoder.x]\ny = 1"))
    with pytest.raises(ConfigError, match=r"\[onnx\.fp32\.component\.vae_decoder\], key 'x': unknown key"):
        load_tolerances("onnx", "fp32", path)


@pytest.mark.parametrize(("backend", "precision"), [("tensorrt", "fp32"), ("onnx", "bf16")])
def test_missing_backend_or_precision_lists_available(tmp_path, backend, precision):
    path = _write(tmp_path, VALID + VALID.replace("fp32", "fp16"))
    with pytest.raises(ConfigError) as info:
        load_tolerances(backend, precision, path)
    message = str(info.value)
    assert str(path) in message and f"[{backend}.{precision}]" in message
    assert "available: onnx.fp16, onnx.fp32" in message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_tolerances("onnx", "fp32", tmp_path / "absent.toml")
    path = _write(tmp_path, "[onnx.fp32.component\nmax_abs = 1")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_tolerances("onnx", "fp32", path)
    assert str(path) in str(info.value)

"""The parity report model (JSON round trip) and its writers (JSON, Markdown, JUnit, HTML)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from diffship.errors import DiffshipError
from diffship.configs import ImageTolerance, TensorTolerance
from diffship.parity.report import (
    HEATMAP_STOPS,
    difference_heatmap,
    write_html,
    write_json,
    write_junit,
    write_markdown,
    write_report,
)
from diffship.parity.result import SCHEMA, ComponentResult, ImageResult, OutputResult, ParityReport

TOL = TensorTolerance(max_abs=1e-4, cosine_min=0.99999, psnr_min=60.0)
IMAGE_TOL = ImageTolerance(psnr_min=40.0, ssim_min=0.99)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((16, 12, 3))


@pytest.fixture
def report() -> ParityReport:
    x = np.linspace(-1, 1, 64).reshape(1, 4, 4, 4)
    good = _image(0)
    bad = np.clip(good + 0.2 * np.random.default_rng(1).standard_normal(good.shape), 0, 1)
    return ParityReport(
        source="tiny-sd",
        export="out/tiny-onnx",
        backend="onnx",
        precision="fp32",
        evaluator="onnxruntime CPUExecutionProvider",
        settings={"prompt": "a red | cube", "seed": 0, "steps": 2, "guidance_scale": 7.5, "height": 16, "width": 12},
        components=[
            ComponentResult(
                "unet",
                calls=2,
                seconds=1.5,
                outputs=[
                    OutputResult.evaluate("out_sample", x, x + 1e-3, TOL),  # fails max_abs and psnr
                    OutputResult.evaluate("identical", x, x.copy(), TOL),  # psnr inf
                ],
            ),
            ComponentResult("vae_decoder", calls=1, seconds=0.5, outputs=[
                OutputResult.evaluate("sample", np.zeros((1, 3, 8, 8)), np.zeros((1, 3, 4, 4)), TOL),  # cosine nan
            ]),  # fmt: skip
        ],
        images=[
            ImageResult.evaluate("text2img", 0, good, good.copy(), IMAGE_TOL),
            ImageResult.evaluate("text2img", 1, good, bad, IMAGE_TOL),
        ],
        started="2025-01-02T03:04:05+00:00",
        seconds=12.25,
        versions={"torch": "2.13.0", "diffship": "0.1.0"},
    )


def test_verdicts_and_prefixed_failures(report):
    assert not report.passed
    failures = report.failures()
    assert "unet/out_sample: max_abs 1.0e-03 > 1.0e-04" in failures
    assert "vae_decoder/sample: shape (1, 3, 4, 4) != expected (1, 3, 8, 8)" in failures
    assert any(f.startswith("text2img[1]: psnr ") for f in failures)
    assert not any(f.startswith(("unet/identical", "text2img[0]")) for f in failures)
    assert [c.passed for c in report.components] == [False, False]
    assert [i.passed for i in report.images] == [True, False]


def test_passed_needs_a_comparison():
    empty = ParityReport("s", "e", "onnx", "fp32", "ort")
    assert not empty.passed
    assert empty.failures() == ["parity: no components or images were compared"]
    no_outputs = ParityReport("s", "e", "onnx", "fp32", "ort", components=[ComponentResult("unet", calls=0)])
    assert no_outputs.failures() == ["unet: no outputs were compared"]
    x = np.ones(3)
    ok = ParityReport("s", "e", "onnx", "fp32", "ort", components=[
        ComponentResult("unet", 1, [OutputResult.evaluate("out", x, x, TOL)])])  # fmt: skip
    assert ok.passed and ok.failures() == []


def test_dict_is_strict_json_and_round_trips(report):
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)  # raises on a bare NaN/Infinity
    assert data["schema"] == SCHEMA and data["passed"] is False
    unet = data["components"][0]
    assert unet["outputs"][1]["metrics"]["psnr"] == "inf"
    assert unet["outputs"][1]["tolerance"]["mean_abs"] is None
    vae = data["components"][1]["outputs"][0]["metrics"]
    assert vae["cosine"] == "nan" and vae["psnr"] == "-inf" and vae["shape_actual"] == [1, 3, 4, 4]
    assert "files" not in data["images"][0]  # images not written yet
    assert data["failures"] == report.failures()

    back = ParityReport.from_dict(json.loads(text))
    assert back.to_dict() == data
    assert back.components[1].outputs[0].metrics.shape_actual == (1, 3, 4, 4)
    assert back.components[0].outputs[1].metrics.psnr == float("inf")
    assert back.images[0].eager_image is None


def test_from_dict_rejects_other_schemas_and_malformed_data(report):
    with pytest.raises(DiffshipError, match="not a diffship.parity/1"):
        ParityReport.from_dict({"schema": "something/2"})
    data = report.to_dict()
    del data["components"][0]["outputs"][0]["metrics"]["cosine"]
    with pytest.raises(DiffshipError, match="malformed"):
        ParityReport.from_dict(data)


def test_json_markdown_junit_writers(report, tmp_path):
    assert json.loads(write_json(report, tmp_path / "r.json").read_text())["schema"] == SCHEMA

    md = write_markdown(report, tmp_path / "r.md").read_text()
    assert "**FAILED: 3 of 5 comparisons outside tolerance**" in md
    assert "- unet/out_sample: max_abs 1.0e-03 > 1.0e-04" in md
    assert "| out_sample | **1.0e-03 (≤ 1.0e-04)** |" in md
    assert "a red \\| cube" in md  # a pipe in a setting does not break the table
    assert "| text2img[0] | inf dB (≥ 40.0 dB) | 1.0000 (≥ 0.9900) |" in md

    root = ET.parse(write_junit(report, tmp_path / "junit.xml")).getroot()
    assert root.tag == "testsuite" and root.get("name") == "diffship.parity"
    cases = root.findall("testcase")
    failing = [c for c in cases if c.find("failure") is not None]
    assert int(root.get("tests")) == len(cases) == 5
    assert int(root.get("failures")) == len(failing) == 3
    assert root.get("timestamp") == "2025-01-02T03:04:05"
    names = {c.get("name") for c in cases}
    assert {"component:unet/out_sample", "component:unet/identical", "image:text2img[0]", "image:text2img[1]"} <= names
    assert {c.get("classname") for c in cases} == {"diffship.parity.onnx.fp32"}
    out_sample = next(c for c in cases if c.get("name") == "component:unet/out_sample").find("failure")
    assert "max_abs 1.0e-03 > 1.0e-04" in out_sample.get("message")
    assert float(cases[0].get("time")) == pytest.approx(0.75)  # 1.5 s over two outputs


def test_write_report_folder(report, tmp_path):
    written = write_report(report, tmp_path / "parity")
    folder = tmp_path / "parity"
    assert {p.name for p in written} >= {"report.json", "report.md", "index.html"}
    assert all(p.is_file() for p in written)
    assert not list(folder.rglob("*.tmp"))  # atomic writes leave no temporaries

    page = (folder / "index.html").read_text()
    data = json.loads((folder / "report.json").read_text())
    for entry, image in zip(data["images"], report.images):
        files = entry["files"]
        assert set(files) == {"eager", "exported", "diff"}
        for relative in files.values():
            assert f'src="{relative}"' in page
            assert not relative.startswith("/")
            with Image.open(folder / relative) as png:
                assert png.size == (12, 16)  # width x height
        with Image.open(folder / files["eager"]) as png:
            assert np.abs(np.asarray(png) / 255 - image.eager_image).max() <= 0.5 / 255 + 1e-12
    assert "http" not in page and "<link" not in page and "<script" not in page  # self-contained
    assert "unet/out_sample: max_abs 1.0e-03 &gt; 1.0e-04" in page
    # The heat-map scale is stated: none for identical images, else the largest difference.
    assert "difference: none, the images are identical" in page
    _, scale = difference_heatmap(report.images[1].eager_image, report.images[1].exported_image)
    assert scale > 0 and f"to yellow = {scale:.3g} (the largest difference)" in page


def test_html_of_a_report_read_back_has_no_stale_images(report, tmp_path):
    write_report(report, tmp_path / "a")
    back = ParityReport.from_dict(json.loads((tmp_path / "a" / "report.json").read_text()))
    assert back.images[0].files  # as recorded
    written = write_html(back, tmp_path / "b")
    assert [p.name for p in written] == ["index.html"]
    assert back.images[0].files == {}
    assert "not kept" in (tmp_path / "b" / "index.html").read_text()


def test_difference_heatmap():
    e = np.zeros((2, 3, 3))
    rgb, scale = difference_heatmap(e, e)
    assert scale == 0.0 and (rgb == HEATMAP_STOPS[0]).all()
    a = e.copy()
    a[1, 2] = [0.3, 0.0, 0.0]  # mean over channels: 0.1, the largest
    a[0, 0] = [0.15, 0.0, 0.0]  # half the largest: the middle stop
    rgb, scale = difference_heatmap(e, a)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert scale == pytest.approx(0.1)
    assert (rgb[1, 2] == HEATMAP_STOPS[-1]).all()
    assert (rgb[0, 0] == HEATMAP_STOPS[2]).all()
    assert (rgb[0, 1] == HEATMAP_STOPS[0]).all()

"""``diffship parity SOURCE A B``: two exports against eager, and against each other."""

from __future__ import annotations

import json
import math

import pytest

from diffship.configs import ImageTolerance, TensorTolerance, Tolerances, between


def test_two_exports_are_judged_by_both_tolerances_combined():
    """Each export may sit at its limit on either side of eager: the bounds of their difference add up."""
    a = Tolerances("onnx", "fp32", TensorTolerance(max_abs=1e-4, cosine_min=0.99999, psnr_min=60.0),
                   ImageTolerance(psnr_min=40.0, ssim_min=0.99), {"unet": TensorTolerance(max_abs=2e-4)})
    b = Tolerances("openvino", "fp16", TensorTolerance(max_abs=1e-2, mean_abs=1e-3, cosine_min=0.9999, psnr_min=50.0),
                   ImageTolerance(psnr_min=30.0, ssim_min=0.95, max_abs=0.1))
    both = between(a, b)
    assert both.backend == "onnx|openvino" and both.precision == "fp32|fp16"
    assert both.component.max_abs == pytest.approx(1.01e-2) and both.component.mean_abs is None
    assert both.component.psnr_min == 44.0
    assert both.component.cosine_min == pytest.approx(math.cos(math.acos(0.99999) + math.acos(0.9999)))
    assert both.component.cosine_min < 0.9999
    assert both.image == ImageTolerance(psnr_min=24.0, ssim_min=pytest.approx(0.94), max_abs=None)
    assert both.for_component("unet").max_abs == pytest.approx(2e-4 + 1e-2)
    assert both.for_component("unet").psnr_min is None  # the override leaves it unchecked on a's side


def test_parity_of_two_exports_writes_three_reports(export_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from diffship.cli import main

    a, b = export_dir("onnx"), export_dir("openvino")
    report, junit = tmp_path / "report", tmp_path / "parity.xml"
    code = main(["parity", "tiny", str(a), str(b), "--steps", "3", "--report", str(report), "--junit", str(junit)])
    out = capsys.readouterr().out
    assert code == 0, out
    # the table title names A (a long path wraps in the terminal's width: compare without whitespace)
    assert out.count("parity passed") == 3 and f"vs{a}" in "".join(out.split())
    for label in ("a", "b", "b-vs-a"):
        assert (report / label / "report.json").is_file() and (tmp_path / f"parity-{label}.xml").is_file()
    cross = json.loads((report / "b-vs-a" / "report.json").read_text())
    assert cross["reference"] == str(a) and cross["export"] == str(b) and cross["passed"]
    assert "reference" not in json.loads((report / "a" / "report.json").read_text())
    # fp32 ONNX Runtime and fp32 OpenVINO agree with each other about as closely as each with eager.
    assert max(o["metrics"]["max_abs"] for c in cross["components"] for o in c["outputs"]) < 1e-4
    assert {c["component"] for c in cross["components"]} == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}


def test_reduced_weights_computed_in_bf16_are_judged_by_both_tolerances():
    """OpenVINO int8 weights computed in bf16 (a tuned mode): both errors add up, as for two exports."""
    from types import SimpleNamespace

    from diffship.configs import load_tolerances
    from diffship.parity.compare import judged_by

    def loaded(precision, compute):
        return SimpleNamespace(manifest=SimpleNamespace(backend="openvino", precision=precision),
                               runners={"unet": SimpleNamespace(compute_precision=compute)})

    both = judged_by(loaded("full-int8", "bf16"))
    assert both.precision == "full-int8|bf16"
    alone = load_tolerances("openvino", "full-int8")
    assert both.image.psnr_min < alone.image.psnr_min and both.component.max_abs > alone.component.max_abs
    assert judged_by(loaded("fp32", "bf16")).precision == "bf16"  # fp32 weights: the compute's own
    assert judged_by(loaded("int8", None)).precision == "int8"


def test_requests_pass_what_each_pipeline_class_takes():
    """One parity request for every class: arguments a class does not take are dropped (FluxFillPipeline has
    no negative prompt), and FLUX.1 Kontext's text-to-image gets the reference image at the requested size
    unless the export has fixed shapes (its tokens follow the image's: a fixed-shape export cannot take them)."""
    import numpy as np

    from diffship.parity.compare import ParitySettings, generate_images

    class Kontext:
        def __call__(self, prompt, image=None, height=None, width=None, max_area=None, _auto_resize=True, **kwargs):
            self.got = dict(prompt=prompt, image=image, height=height, width=width, max_area=max_area,
                            _auto_resize=_auto_resize, **kwargs)
            return type("Out", (), {"images": np.zeros((1, 8, 8, 3))})()

    class Fill:
        def __call__(self, prompt, image, mask_image, height=None, width=None, num_inference_steps=2, generator=None,
                     guidance_scale=1.0, num_images_per_prompt=1, output_type="np"):
            self.got = dict(image=image, mask_image=mask_image)
            return type("Out", (), {"images": np.zeros((1, 8, 8, 3))})()

    settings = ParitySettings(height=64, width=96, steps=2)
    init = np.zeros((64, 96, 3))
    pipe = Kontext()
    generate_images(pipe, settings, "text2img", init, 1)
    assert pipe.got["image"].size == (96, 64) and pipe.got["max_area"] == 64 * 96 and not pipe.got["_auto_resize"]
    generate_images(pipe, settings, "text2img", init, 1, reference=False)
    assert pipe.got["image"] is None and (pipe.got["height"], pipe.got["width"]) == (64, 96)
    fill = Fill()
    generate_images(fill, settings, "inpaint", init, 1)  # no negative_prompt, max_area...: a TypeError if passed
    assert fill.got["mask_image"].size == (96, 64)

"""FLUX.1 Fill and Kontext: other pipeline classes over the Flux transformer export (families ``flux-fill`` and
``flux-kontext``), exported and checked against eager diffusers. A module of its own so the test workers can
run it beside ``test_flux.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffship.cli import main


@pytest.mark.parametrize("backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in ("onnx", "openvino")])
def test_flux_fill_transformer_exports_and_inpaints(backend, tmp_path):
    """FLUX.1 Fill (family ``flux-fill``): the same transformer spec with the masked image and mask packed into
    extra input channels (144 in, 64 out at tiny width): it exports and inpaints. (Core ML converts the same
    transformer spec as test_flux's Core ML case; its Fill export passed parity by hand and was left out of CI
    for time: 45-75 s here.)"""
    from diffship import backends
    from diffship.reference import load
    from diffship.reference.families import family_of

    if backend not in backends.installed():
        pytest.skip(f"the {backend} extra is not installed")
    pipe = load("tiny-flux-fill")
    assert type(pipe).__name__ == "FluxFillPipeline" and pipe.transformer.config.in_channels == 144
    assert family_of("FluxFillPipeline").tasks_for({"vae_encoder"}, {"transformer": dict(pipe.transformer.config)}) == ["inpaint"]
    out, report = tmp_path / "fill", tmp_path / "report"
    assert main(["export", "tiny-flux-fill", str(out), "--backend", backend]) == 0
    assert json.loads((out / "diffship.json").read_text())["tasks"] == ["inpaint"]
    assert main(["parity", "tiny-flux-fill", str(out), "--steps", "2", "--report", str(report)]) == 0
    result = json.loads((report / "report.json").read_text())
    assert {c["component"] for c in result["components"]} == {"text_encoder", "text_encoder_2", "transformer",
                                                              "vae_encoder", "vae_decoder"}
    assert [i["task"] for i in result["images"]] == ["inpaint"] and result["images"][0]["metrics"]["psnr"] >= 60


@pytest.mark.parametrize("backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in ("onnx", "openvino")])
def test_flux_kontext_takes_a_reference_image(backend, tmp_path):
    """FLUX.1 Kontext appends a reference image's packed latents to the image tokens: a dynamic-shape export of
    the same transformer takes them as they are. Parity runs text-to-image with the reference image (and
    inpainting); the exported pipeline then matches eager diffusers with and without one."""
    from diffship import backends
    from diffship.reference import load
    from diffship.reference.families import family_of
    from diffship.runtimes.pipeline import load_pipeline

    # Kontext's inpainting takes the image itself as its reference: a fixed-shape export (Core ML) leaves it out
    kontext = family_of("FluxKontextPipeline")
    assert kontext.tasks_for({"vae_encoder"}, {}, fixed_shapes=True) == ["text2img"]
    assert kontext.tasks_for({"vae_encoder"}, {}) == ["text2img", "inpaint"]
    if backend not in backends.installed():
        pytest.skip(f"the {backend} extra is not installed")
    out, report = tmp_path / "kontext", tmp_path / "report"
    assert main(["export", "tiny-flux-kontext", str(out), "--backend", backend]) == 0
    assert json.loads((out / "diffship.json").read_text())["tasks"] == ["text2img", "inpaint"]
    assert main(["parity", "tiny-flux-kontext", str(out), "--steps", "2", "--report", str(report)]) == 0
    result = json.loads((report / "report.json").read_text())
    assert {i["task"] for i in result["images"]} == {"text2img", "inpaint"}
    assert min(i["metrics"]["psnr"] for i in result["images"]) >= 60
    eager, exported = load("tiny-flux-kontext"), load_pipeline(out)
    reference = np.linspace(0, 1, 32 * 48 * 3, dtype=np.float32).reshape(1, 3, 32, 48)
    kwargs = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, max_area=32 * 32, _auto_resize=False,
                  output_type="np")
    images = {}
    for name, pipe in (("eager", eager), ("exported", exported)):
        pipe.set_progress_bar_config(disable=True)
        for ref in (None, torch.from_numpy(reference)):  # 64 image tokens, + 96 with the 32 x 48 reference
            images[name, ref is None] = pipe(image=ref, generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(images["exported", False], images["eager", False], atol=1e-4)
    np.testing.assert_allclose(images["exported", True], images["eager", True], atol=1e-4)
    assert np.abs(images["eager", False] - images["eager", True]).max() > 1e-3  # the reference changed the image

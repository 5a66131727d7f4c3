"""Exports that are not the plain full dynamic one: partial, static batches, inpainting models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.onnx
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from diffship.errors import ExportedModelError, ShapeError  # noqa: E402
from diffship.workflows import export_pipeline  # noqa: E402
from diffship.parity.compare import ParitySettings, check_parity  # noqa: E402
from diffship.runtimes.adapters import UNetAdapter  # noqa: E402
from diffship.runtimes.pipeline import load_pipeline  # noqa: E402


def _images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def test_partial_export_runs_with_the_other_modules_in_torch(tmp_path, tiny_pipe):
    out = tmp_path / "unet-only"
    m = export_pipeline("tiny", out, components=["unet"])
    assert list(m.components) == ["unet"]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()  # saved as the torch module
    pipe = load_pipeline(out)
    assert isinstance(pipe.unet, UNetAdapter)
    assert isinstance(pipe.vae, torch.nn.Module) and isinstance(pipe.text_encoder, torch.nn.Module)
    np.testing.assert_allclose(_images(pipe), _images(tiny_pipe), atol=1e-4)
    assert check_parity("tiny", out, settings=ParitySettings(steps=2)).passed


def test_static_batch_two(tmp_path):
    out = tmp_path / "static-b2"
    m = export_pipeline("tiny", out, static=(64, 64), batch_size=2, components=["text_encoder", "unet", "vae_decoder"])
    # The UNet and decoder batches are fixed; diffusers calls the text encoder once per prompt list.
    assert m.components["unet"].inputs[0].dims == [4, 4, 8, 8]
    assert m.components["vae_decoder"].inputs[0].dims == [2, 4, 8, 8]
    assert m.components["text_encoder"].inputs[0].dims == ["batch", 77]
    pipe = load_pipeline(out)
    assert _images(pipe, num_images_per_prompt=2).shape == (2, 64, 64, 3)
    with pytest.raises(ShapeError, match="batch 2 with classifier-free guidance"):
        _images(pipe, num_images_per_prompt=1)
    report = check_parity("tiny", out, settings=ParitySettings(steps=2))
    assert report.passed, report.failures()
    assert len(report.images) == 2  # both images of the batch compared


def test_static_without_guidance(tmp_path):
    out = tmp_path / "static-nocfg"
    m = export_pipeline("tiny", out, static=(64, 64), guidance=False, components=["unet"])
    assert m.components["unet"].inputs[0].dims == [1, 4, 8, 8]
    pipe = load_pipeline(out)
    assert _images(pipe, guidance_scale=1.0).shape == (1, 64, 64, 3)


def test_inpainting_model_exports_and_passes_parity(tmp_path, tiny_pipe):
    """A 9-channel (image + mask + masked-image latents) UNet: an inpainting-only export."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    config = dict(tiny_pipe.unet.config, in_channels=9)
    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_config(config).eval()
    src = tmp_path / "inpaint-src"
    StableDiffusionInpaintPipeline(**{**tiny_pipe.components, "unet": unet},
                                   requires_safety_checker=False).save_pretrained(src)
    out = tmp_path / "inpaint"
    m = export_pipeline(src, out)
    assert m.tasks == ["inpaint"]
    assert m.components["unet"].inputs[0].dims == ["batch", 9, "latent_height", "latent_width"]
    pipe = load_pipeline(out)
    assert type(pipe) is StableDiffusionInpaintPipeline
    with pytest.raises(ExportedModelError, match="cannot run 'text2img'; it supports: inpaint"):
        load_pipeline(out, task="text2img")
    report = check_parity(src, out, settings=ParitySettings(steps=3))
    assert report.passed, report.failures()
    assert [i.task for i in report.images] == ["inpaint"]
    assert min(i.metrics.psnr for i in report.images) >= 40


def test_converted_copy_matches_deepcopy_to_without_touching_the_original(tiny_pipe):
    """Reduced-precision exports convert weights while copying (no second fp32 copy of an SDXL UNet)."""
    import copy

    import torch

    from diffship.workflows.export import converted_copy

    unet = tiny_pipe.unet
    half = converted_copy(unet, torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert {p.dtype for p in unet.parameters()} == {torch.float32}
    reference = copy.deepcopy(unet).to(torch.float16)
    for (name, a), (_, b) in zip(half.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert half.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()

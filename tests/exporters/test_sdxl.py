"""SDXL through the toolchain: the tiny-sdxl preset exports to every backend and passes parity; the
refiner (text_encoder_2 only), LCM UNets (timestep_cond), turbo-style use and the fp16 VAE overflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import CLI_BACKENDS, cli_parity
from diffship.cli import main


@pytest.fixture(scope="module")
def sdxl_pipe():
    from diffship.reference import load

    return load("tiny-sdxl")


def test_tiny_sdxl_specs(sdxl_pipe):
    from diffship.reference import specs_for_pipeline

    assert type(sdxl_pipe).__name__ == "StableDiffusionXLPipeline"
    specs = {s.name: s for s in specs_for_pipeline(sdxl_pipe)}
    assert list(specs) == ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"]
    assert specs["text_encoder_2"].output_names == ["text_embeds", "last_hidden_state", "penultimate_hidden_state"]
    unet = {t.name: t.dims for t in specs["unet"].inputs}
    assert unet["text_embeds"] == ("batch", 32) and unet["time_ids"] == ("batch", 6)
    assert unet["encoder_hidden_states"] == ("batch", "sequence", 64)
    assert specs["vae_decoder"].keep_fp32  # the SDXL VAE's force_upcast


def test_wrappers_compute_what_the_pipeline_uses(sdxl_pipe):
    """The exported graphs' outputs are the tensors SDXL's encode_prompt and denoising loop use."""
    from diffship.reference import specs_for_pipeline
    from diffship.reference.recording import record_calls

    specs = {s.name: s for s in specs_for_pipeline(sdxl_pipe)}
    with record_calls(sdxl_pipe, list(specs.values()), limit=2) as calls:
        sdxl_pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    ids = calls["text_encoder_2"][0]["input_ids"]
    with torch.no_grad():
        text_embeds, last, penultimate = specs["text_encoder_2"].wrapper(sdxl_pipe.text_encoder_2)(ids)
        ref = sdxl_pipe.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(penultimate, ref.hidden_states[-2])
    torch.testing.assert_close(text_embeds, ref.text_embeds)
    unet_call = calls["unet"][0]
    assert set(unet_call) == {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"}
    assert unet_call["time_ids"][0].tolist() == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]  # size, crop, target size


@pytest.mark.parametrize("backend", CLI_BACKENDS)
def test_export_and_parity_cli(backend, tmp_path, cli_export):
    cli_parity("tiny-sdxl", backend, cli_export, tmp_path / "report", steps=4, min_image_psnr=40,
               components={"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"})


@pytest.mark.onnx
def test_exported_sdxl_pipeline_behaves_like_diffusers(export_dir_sdxl, sdxl_pipe):
    from diffship.errors import ShapeError
    from diffship.runtimes.pipeline import load_pipeline

    pipe = load_pipeline(export_dir_sdxl)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    pipe.set_progress_bar_config(disable=True)
    # turbo-style: one step, guidance off
    kwargs = dict(prompt="a cat", num_inference_steps=1, guidance_scale=0.0, output_type="np")
    got = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    want = sdxl_pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(got, want, atol=1e-3)
    with pytest.raises(ShapeError, match="clip_skip"):
        pipe("a cat", num_inference_steps=1, clip_skip=1)
    img2img = load_pipeline(export_dir_sdxl, task="img2img")
    assert type(img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"


@pytest.fixture(scope="module")
def export_dir_sdxl(sdxl_export):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    return sdxl_export("onnx")


@pytest.mark.onnx
def test_refiner_exports_with_text_encoder_2_only(tmp_path, sdxl_pipe):
    """The SDXL refiner: img2img without the first text encoder, aesthetic-score time ids (5)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    from diffship.workflows import export_pipeline
    from diffship.parity.compare import ParitySettings, check_parity
    from diffship.runtimes.pipeline import load_pipeline

    config = dict(sdxl_pipe.unet.config, projection_class_embeddings_input_dim=5 * 8 + 32, cross_attention_dim=32)
    torch.manual_seed(5)
    unet = UNet2DConditionModel.from_config(config).eval()
    src = tmp_path / "refiner"
    StableDiffusionXLImg2ImgPipeline(
        vae=sdxl_pipe.vae, text_encoder=None, text_encoder_2=sdxl_pipe.text_encoder_2, tokenizer=None,
        tokenizer_2=sdxl_pipe.tokenizer_2, unet=unet, scheduler=sdxl_pipe.scheduler, requires_aesthetics_score=True,
    ).save_pretrained(src)
    out = tmp_path / "export"
    manifest = export_pipeline(src, out)
    assert set(manifest.components) == {"text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    assert manifest.tasks == ["img2img", "inpaint"]
    assert [i for i in manifest.components["unet"].inputs if i.name == "time_ids"][0].dims == ["batch", 5]
    pipe = load_pipeline(out)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score is True
    report = check_parity(src, out, settings=ParitySettings(steps=4, tasks=("img2img",)))
    assert report.passed, report.failures()


@pytest.mark.onnx
def test_lcm_unet_takes_timestep_cond(tmp_path, tiny_pipe):
    """An LCM-distilled UNet (time_cond_proj_dim) gets the guidance embedding as an input."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from diffship.workflows import export_pipeline
    from diffship.parity.compare import ParitySettings, check_parity

    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_config(dict(tiny_pipe.unet.config, time_cond_proj_dim=16)).eval()
    src = tmp_path / "lcm"
    StableDiffusionPipeline(**{**tiny_pipe.components, "unet": unet,
                               "scheduler": LCMScheduler.from_config(tiny_pipe.scheduler.config)},
                            requires_safety_checker=False).save_pretrained(src)
    out = tmp_path / "export"
    manifest = export_pipeline(src, out, guidance=False, components=["unet"])  # the UNet is what LCM changes
    assert [i.name for i in manifest.components["unet"].inputs][-1] == "timestep_cond"
    report = check_parity(src, out, settings=ParitySettings(steps=4, guidance_scale=8.0, tasks=("text2img",)))
    assert report.passed, report.failures()
    assert report.settings["scheduler"] == "LCMScheduler"


@pytest.mark.onnx
def test_sdxl_vae_fp16_overflow_gives_finite_images(tmp_path, sdxl_pipe):
    """A VAE with SDXL's failure: inner activations past fp16's range (normalized again before the
    output) and no force_upcast. Its fp16 export is kept in fp32, and images stay finite."""
    import copy

    from diffusers import StableDiffusionXLPipeline

    from diffship.workflows import export_pipeline
    from diffship.runtimes.pipeline import load_pipeline

    vae = copy.deepcopy(sdxl_pipe.vae)
    vae.register_to_config(force_upcast=False)
    with torch.no_grad():
        vae.decoder.mid_block.resnets[0].conv2.weight.mul_(1e5)
        vae.decoder.mid_block.resnets[0].conv2.bias.mul_(1e5)
        probe = torch.randn(1, 4, 8, 8) / vae.config.scaling_factor
        assert torch.isfinite(vae.decode(probe).sample).all()
        assert not torch.isfinite(copy.deepcopy(vae).half().decode(probe.half()).sample).all()
    src = tmp_path / "hot"
    StableDiffusionXLPipeline(**{**sdxl_pipe.components, "vae": vae}).save_pretrained(src)
    out = tmp_path / "export"
    manifest = export_pipeline(src, out, precision="fp16", components=["vae_decoder"])  # the rest runs eager
    assert manifest.components["vae_decoder"].precision == "fp32"
    assert "overflows at fp16" in manifest.components["vae_decoder"].details.fp32_fallback
    pipe = load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(image).all() and image.std() > 0


@pytest.mark.tensorrt
def test_tensorrt_builds_sdxl(tmp_path):
    from diffship import backends

    if "tensorrt" not in backends.installed():
        pytest.skip("the tensorrt extra is not installed")
    out = tmp_path / "export"
    # the UNet alone: SDXL's added conditions are what is new here (the other components build as tiny's do)
    assert main(["export", "tiny-sdxl", str(out), "--backend", "tensorrt", "--static", "64x64",
                 "--component", "unet"]) == 0
    manifest = json.loads((out / "diffship.json").read_text())
    unet = manifest["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet["files"] and all(f.endswith(".plan") for f in unet["files"])


# --- Apple's Swift SDXL pipeline (here, beside the other tests of the Core ML export it packages, so both
# share one export on one test worker) ---

@pytest.fixture(scope="module")
def sdxl_exports(tmp_path_factory, sdxl_export):
    """tiny-sdxl (base: the session's CLI export) and an SDXL refiner built from its parts, exported to
    Core ML (the refiner with what the Swift pipeline loads: no VAE encoder, to keep the suite short)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    import torch

    from diffship.reference import load
    from diffship.workflows import export_pipeline

    root = tmp_path_factory.mktemp("swift-sdxl")
    base = sdxl_export("coreml")
    sdxl = load("tiny-sdxl")
    config = dict(sdxl.unet.config, projection_class_embeddings_input_dim=5 * 8 + 32, cross_attention_dim=32)
    torch.manual_seed(5)
    StableDiffusionXLImg2ImgPipeline(
        vae=sdxl.vae, text_encoder=None, text_encoder_2=sdxl.text_encoder_2, tokenizer=None,
        tokenizer_2=sdxl.tokenizer_2, unet=UNet2DConditionModel.from_config(config).eval(), scheduler=sdxl.scheduler,
        requires_aesthetics_score=True,
    ).save_pretrained(root / "refiner-source")
    refiner = root / "refiner"
    export_pipeline(root / "refiner-source", refiner, backend="coreml",
                    components=["text_encoder_2", "unet", "vae_decoder"])
    return base, refiner


@pytest.mark.coreml
def test_sdxl_packages_with_the_io_apples_sdxl_pipeline_reads(sdxl_exports, tmp_path):
    """Checked against Apple's Swift sources: StableDiffusionXL+Resources.swift (names), TextEncoderXL.swift
    (outputs hidden_embeds and pooled_outputs), Unet.swift (sample, timestep, encoder_hidden_states as
    (2, D, 1, 77), text_embeds, time_ids; a refiner is recognised by 5 time ids)."""
    ct = pytest.importorskip("coremltools", reason="the coreml extra is not installed")
    from conftest import mlpackage_io as io
    from diffship.packaging.swift import package_swift

    base, refiner = sdxl_exports
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    out = tmp_path / "base"
    facts = package_swift(base, out, compile_models=False, chunk_unet=True)
    assert [n for n in facts["resources"] if n.endswith(".mlpackage")] == [
        "TextEncoder.mlpackage", "TextEncoder2.mlpackage", "UnetChunk1.mlpackage", "UnetChunk2.mlpackage",
        "VAEDecoder.mlpackage", "VAEEncoder.mlpackage"]
    assert facts["chunk_max_abs_error"] <= 1e-3 and (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    for name, width, pooled in (("TextEncoder", 32, 32), ("TextEncoder2", 32, 32)):
        inputs, outputs = io(out / f"{name}.mlpackage")
        assert inputs == [("input_ids", [1, 77], float32)]
        shapes = {n: s for n, s, _ in outputs}
        assert shapes["hidden_embeds"] == [1, 77, width] and shapes["pooled_outputs"] == [1, pooled], name
    whole = package_swift(base, tmp_path / "whole", compile_models=False)
    unet_in = {n: s for n, s, _ in io(tmp_path / "whole" / "Unet.mlpackage")[0]}
    assert unet_in == {"sample": [2, 4, 8, 8], "timestep": [2], "encoder_hidden_states": [2, 64, 1, 77],
                       "text_embeds": [2, 32], "time_ids": [2, 6]}
    assert whole["notes"] and "decoderScaleFactor" in whole["notes"][-1]  # SDXL's VAE scales latents by 0.13025
    refined = package_swift(refiner, tmp_path / "refiner", compile_models=False)
    assert "TextEncoder.mlpackage" not in refined["resources"] and "TextEncoder2.mlpackage" in refined["resources"]
    unet_in = {n: s for n, s, _ in io(tmp_path / "refiner" / "Unet.mlpackage")[0]}
    assert unet_in["time_ids"] == [2, 5] and unet_in["encoder_hidden_states"] == [2, 32, 1, 77]

"""Stable Diffusion 3 / 3.5 through the toolchain: the tiny-sd3 preset (CLIP-L and CLIP-G with projection,
a T5 encoder, an MMDiT with SD3.5's qk-norm and dual-attention layer, the 16-channel VAE, flow matching) exports to every
backend and passes parity on all three tasks; what cannot be exported yet is refused by name."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import CLI_BACKENDS, cli_parity
from diffship.cli import main


@pytest.fixture(scope="module")
def sd3_pipe():
    from diffship.reference import load

    return load("tiny-sd3")


@pytest.fixture(scope="module")
def sd3_export(cli_export):
    """``sd3_export(backend)``: ``diffship export tiny-sd3 OUT --backend B``, once per session."""
    return lambda backend: cli_export("tiny-sd3", backend)


def test_tiny_sd3_specs(sd3_pipe):
    from diffship.reference import specs_for_pipeline
    from diffship.reference.families import family_of
    from diffship.reference.pipelines import pipeline_configs

    assert type(sd3_pipe).__name__ == "StableDiffusion3Pipeline"
    assert type(sd3_pipe.text_encoder_3).__name__ == "T5EncoderModel"
    specs = {s.name: s for s in specs_for_pipeline(sd3_pipe)}
    assert list(specs) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_encoder", "vae_decoder"]
    t5 = specs["text_encoder_3"]
    assert t5.output_names == ["last_hidden_state"] and t5.default_dims == {"t5_sequence": 256}
    assert specs["text_encoder"].output_names == ["text_embeds", "last_hidden_state", "penultimate_hidden_state"]
    transformer = specs["transformer"]
    assert transformer.input_names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    assert transformer.output_names == ["out_hidden_states"] and transformer.denoiser
    assert {t.name: t.dims for t in transformer.inputs}["encoder_hidden_states"] == ("batch", "joint_sequence", 64)
    assert transformer.default_dims == {"joint_sequence": 77 + 256} and transformer.multiples["latent_height"] == 2
    assert transformer.symbolic_dims(False) == {"batch", "joint_sequence", "latent_height", "latent_width"}
    assert transformer.max_dims == {"latent_height": 64, "latent_width": 64}  # pos_embed_max_size 32 x patch 2
    assert specs["vae_decoder"].inputs[0].dims[1] == 16  # 16 latent channels
    # without T5 (diffusers allows it to be absent) the transformer's text sequence keeps its size
    configs = {**pipeline_configs(sd3_pipe), "text_encoder_3": None}
    without = {s.name: s for s in family_of("StableDiffusion3Pipeline").specs(configs)}
    assert "text_encoder_3" not in without and without["transformer"].default_dims == {"joint_sequence": 77 + 256}


def test_the_transformer_wrapper_computes_what_the_pipeline_uses(sd3_pipe):
    from diffship.reference import specs_for_pipeline
    from diffship.reference.recording import record_calls

    specs = {s.name: s for s in specs_for_pipeline(sd3_pipe)}
    with record_calls(sd3_pipe, list(specs.values()), limit=2) as calls:
        sd3_pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent")
    call = calls["transformer"][0]
    assert call["encoder_hidden_states"].shape == (2, 77 + 256, 64) and call["timestep"].shape == (2,)
    with torch.no_grad():
        got = specs["transformer"].wrapper(sd3_pipe.transformer)(*call.values())
        want = sd3_pipe.transformer(**call, return_dict=False)[0]
    torch.testing.assert_close(got, want)


def test_sizes_past_the_positional_embedding_are_refused_before_export(tmp_path):
    """A static size or a TensorRT profile past the transformer's positional embedding (512 px for tiny-sd3)
    is refused by name before any work, instead of a trace error or an engine that fails at its largest size."""
    from diffship.errors import ShapeError
    from diffship.workflows.export import export_pipeline

    with pytest.raises(ShapeError, match=r"latent_width 72 is over 64.*at most 512 px a side"):
        export_pipeline("tiny-sd3", tmp_path / "static", backend="onnx", static=(64, 576))
    pytest.importorskip("tensorrt_rtx", reason="the tensorrt extra (TensorRT-RTX builds engines on a CPU) is not installed")
    with pytest.raises(ShapeError, match=r"profile 1 image\(s\) of 64 x 64-1024 px: transformer: latent_width 128 is over 64"):
        export_pipeline("tiny-sd3", tmp_path / "engines", backend="tensorrt", components=["transformer"],
                        backend_options={"profile": {"width": [64, 64, 1024]}})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("backend", CLI_BACKENDS)
def test_export_and_parity_cli(backend, tmp_path, cli_export):
    cli_parity("tiny-sd3", backend, cli_export, tmp_path / "report", steps=2, min_image_psnr=60,
               components={"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_encoder",
                           "vae_decoder"})


@pytest.mark.onnx
def test_exported_sd3_pipeline_behaves_like_diffusers(sd3_export, sd3_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffship.errors import ShapeError
    from diffship.runtimes.pipeline import load_pipeline

    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    folder = sd3_export("onnx")
    pipe = load_pipeline(folder)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and type(pipe.text_encoder_3).__name__ == "TextEncoderAdapter"
    pipe.set_progress_bar_config(disable=True)
    # the seed snippets' patterns: a scheduler swap (with another shift), generator lists, a shorter T5 sequence
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(sd3_pipe.scheduler.config, shift=1.5)
    eager = type(sd3_pipe)(**{**sd3_pipe.components, "scheduler": pipe.scheduler})
    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=3, output_type="np", max_sequence_length=64)
    got = pipe(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    want = eager(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    assert np.ptp(want) > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4)
    # image sizes are dynamic (in even patches) up to the positional embedding's extent: 32 patches of 2x2
    # latent pixels, 512 px; past it the graph's crop would come out short and fail inside the runtime
    kwargs = dict(prompt="a cat", num_inference_steps=1, height=80, width=48, output_type="np")
    np.testing.assert_allclose(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images,
                               eager(**kwargs, generator=torch.Generator().manual_seed(0)).images, atol=1e-4)
    with pytest.raises(ShapeError, match=r"transformer: latent_height 72 is over 64, the most this model takes \(its "
                                         r"positional embedding's extent\); use images of at most 512 px a side"):
        pipe("a cat", num_inference_steps=1, height=576, width=64)
    with pytest.raises(ShapeError, match="skip-layer guidance"):
        pipe("a cat", num_inference_steps=10, skip_guidance_layers=[1])  # guidance skips layers at step 2
    img2img = load_pipeline(folder, task="img2img")
    assert type(img2img).__name__ == "StableDiffusion3Img2ImgPipeline"


#: diffusers calls of the SD3 pipeline, each compared with eager on the same seed (the interface suite's
#: patterns that differ for a transformer pipeline: no guidance halves the transformer batch, sizes are
#: multiples of the patch, latents in and out are 16-channel).
CALLS = {
    "default": {},
    "negative_prompt": dict(negative_prompt="blurry"),
    "no_guidance": dict(guidance_scale=1.0),
    "num_images_per_prompt": dict(num_images_per_prompt=2),
    "output_pt": dict(output_type="pt"),
    "output_latent": dict(output_type="latent"),
    "latents_in": dict(latents=torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))),
    "return_tuple": dict(return_dict=False),
    "other_size": dict(height=32, width=96),
}


@pytest.fixture(scope="module")
def sd3_loaded(cli_pipeline):
    """``sd3_loaded(backend)``: the loaded CLI export of tiny-sd3."""
    return lambda backend: cli_pipeline("tiny-sd3", backend)


@pytest.mark.parametrize("call", list(CALLS))
def test_pipeline_calls_match_eager(backend, call, sd3_loaded, sd3_pipe):
    # `backend`: every backend that exports and runs here with dynamic shapes (the interface suite's fixture)
    kwargs = dict(prompt="a cat", num_inference_steps=2, **{"output_type": "np", **CALLS[call]})
    got = sd3_loaded(backend)(**kwargs, generator=torch.Generator().manual_seed(0))
    want = sd3_pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    got, want = (r[0] if call == "return_tuple" else r.images for r in (got, want))
    got, want = (np.asarray(x.float() if torch.is_tensor(x) else x) for x in (got, want))
    assert got.shape == want.shape and np.ptp(want) > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

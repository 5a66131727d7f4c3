"""Flux through the toolchain: the tiny-flux preset (CLIP-L's pooled output, a T5 encoder with an offline
Unigram tokenizer, the Flux transformer with FLUX.1-dev's guidance embedding over packed latents, the
16-channel VAE, flow matching with the resolution-dependent shift) exports to every backend and passes
parity on all three tasks; what the exports cannot take is refused by name."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import CLI_BACKENDS, cli_parity
from diffship.cli import main


@pytest.fixture(scope="module")
def flux_pipe():
    from diffship.reference import load

    pipe = load("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_export(cli_export):
    """``flux_export(backend)``: ``diffship export tiny-flux OUT --backend B``, once per session."""
    return lambda backend: cli_export("tiny-flux", backend)


def test_tiny_flux_specs(flux_pipe):
    from diffship.errors import UnsupportedPipelineError
    from diffship.reference import ShapeProfile, specs_for_pipeline
    from diffship.reference.families import family_of
    from diffship.reference.pipelines import pipeline_configs

    assert type(flux_pipe).__name__ == "FluxPipeline" and type(flux_pipe.text_encoder_2).__name__ == "T5EncoderModel"
    specs = {s.name: s for s in specs_for_pipeline(flux_pipe)}
    assert list(specs) == ["text_encoder", "text_encoder_2", "transformer", "vae_encoder", "vae_decoder"]
    assert specs["text_encoder"].output_names == ["last_hidden_state", "pooler_output"]
    t5 = specs["text_encoder_2"]
    assert t5.output_names == ["last_hidden_state"] and t5.inputs[0].dims == ("batch", "t5_sequence")
    transformer = specs["transformer"]
    assert transformer.input_names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                       "img_ids", "txt_ids", "guidance"]
    assert transformer.output_names == ["out_hidden_states"] and transformer.batch_multiplier == 1
    # 2x2 latent pixels per token: 256 px with the VAE's factor 2 -> 128 latent pixels -> 64 x 64 tokens
    dims = transformer.dims(ShapeProfile(height=256, width=192))
    assert (dims["image_sequence"], dims["text_sequence"]) == (64 * 48, 512)
    assert transformer.example_inputs(ShapeProfile(height=64, width=64))["img_ids"].shape == (256, 3)
    assert {"image_sequence", "text_sequence"} <= transformer.symbolic_dims(False)
    assert specs["vae_decoder"].inputs[0].dims[1] == 16
    # FLUX.1-schnell: no guidance embedding, so no guidance input
    configs = pipeline_configs(flux_pipe)
    schnell = {**configs, "transformer": {**configs["transformer"], "guidance_embeds": False}}
    assert "guidance" not in family_of("FluxPipeline").specs(schnell)[2].input_names
    for other in ("FluxControlPipeline", "Flux2Pipeline"):
        with pytest.raises(UnsupportedPipelineError, match=f"{other}' is not supported; diffship exports: .*FluxPipeline"):
            family_of(other)


def test_the_transformer_wrapper_computes_what_the_pipeline_uses(flux_pipe):
    from diffship.errors import ShapeError
    from diffship.reference import specs_for_pipeline
    from diffship.reference.calls import flux_transformer_inputs
    from diffship.reference.recording import record_calls

    specs = {s.name: s for s in specs_for_pipeline(flux_pipe)}
    with record_calls(flux_pipe, list(specs.values()), limit=2) as calls:
        flux_pipe("a cat", num_inference_steps=2, height=64, width=96, generator=torch.Generator().manual_seed(0),
                  output_type="latent")
    call = calls["transformer"][0]
    assert call["hidden_states"].shape == (1, 16 * 24, 64) and call["img_ids"].shape == (16 * 24, 3)
    assert call["txt_ids"].shape == (512, 3) and call["guidance"].shape == (1,)
    with torch.no_grad():
        got = specs["transformer"].wrapper(flux_pipe.transformer)(*call.values())
        want = flux_pipe.transformer(**call, return_dict=False)[0]
    torch.testing.assert_close(got, want)
    # what the graphs cannot take, refused by name
    with pytest.raises(ShapeError, match="does not take joint_attention_kwargs"):
        flux_transformer_inputs({**call, "joint_attention_kwargs": {"scale": 0.5}})
    with pytest.raises(ShapeError, match="takes a guidance value"):
        flux_transformer_inputs({**call, "guidance": None})
    with pytest.raises(ShapeError, match="no guidance embedding"):
        flux_transformer_inputs(call, guidance=False)


def test_the_t5_tokenizer_is_built_offline(flux_pipe, tmp_path):
    from diffship.reference.pipelines import write_pipeline_files

    tok = flux_pipe.tokenizer_2
    ids = tok("a cat and a dog", padding="max_length", max_length=8).input_ids
    assert tok.convert_ids_to_tokens(ids[:5]) == ["\u2581a", "\u2581cat", "\u2581and", "\u2581a", "\u2581dog"]
    assert ids[5:] == [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id] and tok.model_max_length == 512
    # a word outside the toy vocabulary is spelled out from its pieces, and decodes back
    riding = tok("riding").input_ids
    assert len(riding) > 2 and tok.decode(riding, skip_special_tokens=True) == "riding"
    write_pipeline_files(flux_pipe, tmp_path, "onnx", {})
    # CLIP's BPE files are written for the CLIP tokenizer only (a Unigram tokenizer.json has none)
    assert (tmp_path / "tokenizer" / "vocab.json").is_file()
    assert sorted(p.name for p in (tmp_path / "tokenizer_2").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("backend", CLI_BACKENDS)
def test_export_and_parity_cli(backend, tmp_path, cli_export):
    cli_parity("tiny-flux", backend, cli_export, tmp_path / "report", steps=2, min_image_psnr=60,
               components={"text_encoder", "text_encoder_2", "transformer", "vae_encoder", "vae_decoder"})


def test_a_static_size_whose_attention_cannot_fit_is_refused_before_exporting(tmp_path, capsys):
    # 4096 x 4096 px: 2048^2 latent pixels, 1024^2 image tokens + 512 text tokens, two heads: ~8.8 TB of scores
    assert main(["export", "tiny-flux", str(tmp_path / "out"), "--static", "4096x4096"]) == 2
    assert "the transformer attention scores over 1049088 image and text tokens alone take" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", [pytest.param("onnx", marks=pytest.mark.onnx),
                                     # cannot run here: the probe runs only the fp16 torch module
                                     pytest.param("tensorrt", marks=pytest.mark.tensorrt)])
def test_a_t5_that_saturates_in_fp16_is_kept_fp32(flux_pipe, tmp_path, backend):
    """T5's known fp16 overflow: transformers' T5 clamps fp16 infinities to the largest fp16 value, so the
    overflow stays finite and only the hidden states are wrong. The export's probe watches the fp16 torch
    module's activations, finds it and keeps that T5 in fp32; a T5 that does not saturate stays fp16."""
    import copy

    from diffusers import FluxPipeline

    from diffship import backends
    from diffship.workflows import export_pipeline

    if backend not in backends.installed():
        pytest.skip(f"the {backend} extra is not installed")
    fine = export_pipeline("tiny-flux", tmp_path / "fine", backend=backend, precision="fp16",
                           components=["text_encoder_2"])
    assert fine.components["text_encoder_2"].precision == "fp16"
    hot = copy.deepcopy(flux_pipe.text_encoder_2)
    with torch.no_grad():  # the first block's feed-forward output reaches 65504 (measured on the example inputs:
        # x1e4 stays clear, x3e4 saturates while its outputs stay finite, cosine 0.99968 to fp32)
        hot.encoder.block[0].layer[-1].DenseReluDense.wo.weight.mul_(3e4)
    src = tmp_path / "hot-t5"
    FluxPipeline(**{**flux_pipe.components, "text_encoder_2": hot}).save_pretrained(src)
    m = export_pipeline(src, tmp_path / "out", backend=backend, precision="fp16", components=["text_encoder_2"])
    entry = m.components["text_encoder_2"]
    assert entry.precision == "fp32", entry.details.fp32_fallback
    assert entry.details.fp32_fallback == ("text_encoder.encoder.block.0.layer.1.DenseReluDense.wo overflows at fp16 "
                                           "on the example inputs (activations reach fp16's limit, 65504)")


@pytest.mark.tensorrt
def test_tensorrt_engines_build(tmp_path):
    from diffship import backends
    from diffship.backends.manifest import read_manifest

    if "tensorrt" not in backends.installed():
        pytest.skip("the tensorrt extra is not installed")
    # the transformer's engine (what is new for Flux; the CLIP, T5 and VAE engines are built as SD3's are),
    # with two profiles: the dynamic preset's sizes at the default T5 sequence, and a range of T5 sequences
    out = tmp_path / "out"
    profiles = '[{"batch": [1, 1, 4], "height": [128, 256, 512], "width": [128, 256, 512]}, ' \
               '{"height": [256, 256, 256], "width": [256, 256, 256], "text_sequence": [64, 128, 512]}]'
    assert main(["export", "tiny-flux", str(out), "--backend", "tensorrt", "--component", "transformer",
                 "-o", f"profile={profiles}"]) == 0
    manifest = read_manifest(out)
    transformer = manifest.components["transformer"]
    assert {t.name: t.dims for t in transformer.inputs}["img_ids"] == ["image_sequence", 3]
    ranges = transformer.details.profiles[0].inputs
    # the image tokens follow the image size range (2x2 latent pixels each: 128-512 px at the VAE's factor 2),
    # the text tokens are the T5 sequence
    assert ranges["img_ids"].min == [32 * 32, 3] and ranges["img_ids"].max == [128 * 128, 3]
    assert ranges["txt_ids"].opt == [512, 3] and ranges["hidden_states"].max == [4, 128 * 128, 64]
    second = transformer.details.profiles[1]  # as TensorRT read it back: the T5 range on the text tokens
    assert second.request.text_sequence == (64, 128, 512) and "_t64-512." in transformer.details.engine
    assert (second.inputs["txt_ids"].min, second.inputs["txt_ids"].max) == ([64, 3], [512, 3])
    assert second.inputs["encoder_hidden_states"].opt[1] == 128 and second.inputs["img_ids"].min == [64 * 64, 3]
    # the runner picks the profile by the call's shapes (no GPU needed to choose)
    from diffship.errors import ShapeError
    from diffship.runtimes.tensorrt import select_profile

    def call(tokens):
        shapes = {name: tuple(r.opt) for name, r in second.inputs.items()}
        return {**shapes, "txt_ids": (tokens, 3), "encoder_hidden_states": (shapes["encoder_hidden_states"][0], tokens,
                                                                            shapes["encoder_hidden_states"][2])}

    assert select_profile(transformer.details.profiles, call(512), "transformer") == 0
    assert select_profile(transformer.details.profiles, call(77), "transformer") == 1
    with pytest.raises(ShapeError, match="with 64-512 T5 tokens"):
        select_profile(transformer.details.profiles, call(32), "transformer")


@pytest.fixture(scope="module")
def flux_loaded(cli_pipeline):
    """``flux_loaded(backend)``: the loaded CLI export of tiny-flux."""
    return lambda backend: cli_pipeline("tiny-flux", backend)


@pytest.mark.onnx
def test_exported_flux_pipeline_behaves_like_diffusers(flux_loaded, flux_export, flux_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffship.errors import ShapeError
    from diffship.runtimes.pipeline import load_pipeline

    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pipe = flux_loaded("onnx")
    assert type(pipe).__name__ == "FluxPipeline"
    # the seed snippets' patterns: a scheduler swap (a fixed shift instead of the resolution-dependent one),
    # generator lists, a shorter T5 sequence and another image size (both dynamic)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(flux_pipe.scheduler.config, use_dynamic_shifting=False,
                                                            shift=2.0)
    eager = type(flux_pipe)(**{**flux_pipe.components, "scheduler": scheduler})
    exported = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=3, output_type="np", max_sequence_length=64,
                  height=64, width=96)
    got = exported(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    want = eager(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    assert got.shape == (2, 64, 96, 3) and np.ptp(want) > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the components directly: the T5 encoder as transformers' module is called
    ids = pipe.tokenizer_2(["a cat"], padding="max_length", max_length=32, return_tensors="pt").input_ids
    torch.testing.assert_close(pipe.text_encoder_2(ids)[0], flux_pipe.text_encoder_2(ids)[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ShapeError, match="does not take joint_attention_kwargs"):
        pipe("a cat", num_inference_steps=1, height=64, width=64, joint_attention_kwargs={"scale": 0.5})
    img2img = load_pipeline(flux_export("onnx"), task="img2img")
    assert type(img2img).__name__ == "FluxImg2ImgPipeline"


#: diffusers calls of the Flux pipeline, each compared with eager on the same seed (the interface suite's
#: patterns that differ for Flux: guidance-distilled -- guidance_scale is an input, not a doubled batch --,
#: true classifier-free guidance with a negative prompt, packed latents in and out).
CALLS = {
    "default": {},
    "guidance_scale": dict(guidance_scale=5.0),
    "true_cfg": dict(negative_prompt="blurry", true_cfg_scale=2.0),
    "num_images_per_prompt": dict(num_images_per_prompt=2),
    "output_latent": dict(output_type="latent"),
    "latents_in": dict(latents=torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(7))),
    "return_tuple": dict(return_dict=False),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_pipeline_calls_match_eager(backend, call, flux_loaded, flux_pipe):
    # `backend`: every backend that exports and runs here with dynamic shapes (the interface suite's fixture)
    kwargs = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, **{"output_type": "np", **CALLS[call]})
    got = flux_loaded(backend)(**kwargs, generator=torch.Generator().manual_seed(0))
    want = flux_pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    got, want = (r[0] if call == "return_tuple" else r.images for r in (got, want))
    got, want = (np.asarray(x.float() if torch.is_tensor(x) else x) for x in (got, want))
    assert got.shape == want.shape and np.ptp(want) > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

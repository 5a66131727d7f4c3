"""The built-in tiny pipeline, source loading, and the component specs."""

from __future__ import annotations

import json

import pytest
import torch

from diffship.errors import ShapeError, SourceError, UnsupportedPipelineError
from diffship.reference import ShapeProfile, build_tiny, load, load_with_info, specs_for_pipeline
from diffship.reference.loader import fingerprint


def test_tiny_is_identical_every_build(tmp_path, tiny_dir):
    rebuilt = build_tiny(tmp_path / "again")
    assert fingerprint(rebuilt) == fingerprint(tiny_dir)


def test_tiny_has_the_diffusers_layout(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("text_encoder", "unet", "vae", "tokenizer", "scheduler"):
        assert (tiny_dir / part).is_dir()
    assert (tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]


def test_text_encoder_weights_load_in_either_key_layout(tmp_path, tiny_dir, tiny_pipe):
    """The preset stores CLIP keys as transformers 4 and SD checkpoints do (``text_model.``; transformers 4
    initialises a model at random from transformers 5's unprefixed keys); diffship's weight check takes
    both layouts, as transformers 5 loads both."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = tiny_dir / "text_encoder" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    copy = tmp_path / "unprefixed"
    shutil.copytree(tiny_dir, copy)
    state = load_file(weights)
    save_file({k.removeprefix("text_model."): v for k, v in state.items()}, copy / "text_encoder" / "model.safetensors")
    pipe = load(copy)
    for name, value in tiny_pipe.text_encoder.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[name], value)


def test_tiny_tokenizer_is_real_clip_bpe(tiny_pipe):
    tok = tiny_pipe.tokenizer
    # Token ids of OpenAI CLIP's vocabulary (as used by every SD 1.x checkpoint).
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tiny_pipe.text_encoder.config.vocab_size == 49408


def test_tiny_is_sd1_shaped(tiny_pipe):
    assert tiny_pipe.vae_scale_factor == 8
    unet = tiny_pipe.unet.config
    assert "CrossAttnDownBlock2D" in unet.down_block_types and unet.cross_attention_dim == 32
    assert tiny_pipe.text_encoder.config.hidden_size == unet.cross_attention_dim
    image = tiny_pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_load_folder_reports_source(tiny_dir):
    pipe, info = load_with_info(tiny_dir)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert info.kind == "folder" and info.fingerprint == fingerprint(tiny_dir)
    assert pipe.safety_checker is None


def test_load_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder, and not a built-in preset"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no model_index.json"):
        load(tmp_path / "empty")
    bad = tmp_path / "flux"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "FluxControlPipeline"}))
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionPipeline, StableDiffusionImg2ImgPipeline"):
        load(bad)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    with pytest.raises(SourceError, match="not a valid model_index.json"):
        load(tmp_path / "broken")


def test_v_prediction_scheduler_config_is_kept(tmp_path, tiny_pipe):
    """SD 2.x v-prediction lives in the scheduler config; loading and exporting must carry it through."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction")
    StableDiffusionPipeline(**{**tiny_pipe.components, "scheduler": sched},
                            requires_safety_checker=False).save_pretrained(tmp_path / "v")
    assert load(tmp_path / "v").scheduler.config.prediction_type == "v_prediction"


def test_specs_shapes_for_profiles(tiny_pipe):
    specs = {s.name: s for s in specs_for_pipeline(tiny_pipe)}
    profile = ShapeProfile(batch_size=3, height=96, width=64)
    unet = specs["unet"].example_inputs(profile)
    assert unet["sample"].shape == (6, 4, 12, 8)  # guidance doubles the UNet batch
    assert unet["timestep"].shape == (6,) and unet["timestep"].dtype == torch.float32
    assert unet["encoder_hidden_states"].shape == (6, 77, 32)
    assert specs["text_encoder"].example_inputs(profile)["input_ids"].shape == (3, 77)
    assert specs["vae_decoder"].example_inputs(profile)["latent_sample"].shape == (3, 4, 12, 8)
    assert specs["vae_encoder"].example_inputs(profile, "fp16")["sample"].dtype == torch.float16
    no_cfg = ShapeProfile(batch_size=3, height=96, width=64, guidance=False)
    assert specs["unet"].example_inputs(no_cfg)["sample"].shape[0] == 3
    assert specs["vae_decoder"].keep_fp32  # AutoencoderKL's force_upcast
    with pytest.raises(ShapeError, match="height 100 is not a positive multiple of 8"):
        ShapeProfile(height=100).validate(8)


def test_wrappers_equal_the_eager_modules(tiny_pipe):
    specs = {s.name: s for s in specs_for_pipeline(tiny_pipe)}
    profile = ShapeProfile(height=64, width=64)
    with torch.no_grad():
        ex = specs["unet"].example_inputs(profile)
        got = specs["unet"].wrapper(tiny_pipe.unet)(*ex.values())
        assert torch.equal(got, tiny_pipe.unet(ex["sample"], ex["timestep"], ex["encoder_hidden_states"]).sample)
        z = specs["vae_decoder"].example_inputs(profile)["latent_sample"]
        assert torch.equal(specs["vae_decoder"].wrapper(tiny_pipe.vae)(z), tiny_pipe.vae.decode(z).sample)
        x = specs["vae_encoder"].example_inputs(profile)["sample"]
        dist = tiny_pipe.vae.encode(x).latent_dist
        params = specs["vae_encoder"].wrapper(tiny_pipe.vae)(x)
        assert torch.equal(params, torch.cat([dist.mean, dist.logvar], dim=1))
        ids = specs["text_encoder"].example_inputs(profile)["input_ids"]
        hidden, pooled = specs["text_encoder"].wrapper(tiny_pipe.text_encoder)(ids)
        assert torch.equal(hidden, tiny_pipe.text_encoder(ids)[0])
        assert torch.equal(pooled, tiny_pipe.text_encoder(ids).pooler_output)


def test_call_mapping_matches_diffusers_calls(tiny_pipe):
    specs = {s.name: s for s in specs_for_pipeline(tiny_pipe)}
    unet = specs["unet"]
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    inputs = unet.inputs_for_call(tiny_pipe.unet.forward, (x, torch.tensor(981)), {"encoder_hidden_states": emb})
    assert inputs["timestep"].tolist() == [981.0, 981.0]  # scalar t broadcast over the batch, float32
    with pytest.raises(ShapeError, match="timestep_cond"):
        unet.inputs_for_call(tiny_pipe.unet.forward, (x, 1, emb), {"timestep_cond": torch.zeros(2, 4)})
    with pytest.raises(ShapeError, match="clip_skip"):
        specs["text_encoder"].inputs_for_call(tiny_pipe.text_encoder.forward, (torch.zeros(1, 77, dtype=torch.long),),
                                              {"output_hidden_states": True})

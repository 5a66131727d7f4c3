"""Presets built tensor by tensor (flux-arch's 12B transformer and T5-XXL): checked on tiny-flux built
the same way -- a folder diffusers loads with every weight present, seeded per tensor, the same bytes on
every build, shards bounded, and the full-size recipe's shapes without materialising them."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from diffship.reference import streamed
from diffship.reference.presets import RECIPES, build_preset


@pytest.fixture(scope="module")
def streamed_flux(tmp_path_factory):
    recipe = dataclasses.replace(RECIPES["tiny-flux"], name="tiny-flux-streamed",
                                 streamed=("transformer", "text_encoder_2"))
    return build_preset(recipe, tmp_path_factory.mktemp("streamed") / "flux")


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_diffusers_loads_it_with_every_weight_drawn_as_planned(streamed_flux):
    from diffusers import FluxPipeline

    index = json.loads((streamed_flux / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    pipe = FluxPipeline.from_pretrained(streamed_flux, torch_dtype=torch.bfloat16)  # missing keys would fail
    state = pipe.transformer.state_dict()
    for name, shape, how, fan_in in streamed.tensor_plan(pipe.transformer):
        want = streamed.draw(name, shape, how, fan_in, seed=10).to(torch.bfloat16)
        assert torch.equal(state[name], want), name
    t5 = pipe.text_encoder_2
    assert t5.shared.weight.dtype == torch.bfloat16 and t5.encoder.embed_tokens.weight is t5.shared.weight
    assert t5.shared.weight.float().std() > 0.5  # drawn like nn.Embedding, not left at zero
    pipe.to(torch.float32)
    image = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(image).all() and image.std() > 0


def test_the_same_bytes_on_every_build_and_shards_stay_bounded(streamed_flux, tmp_path, monkeypatch):
    monkeypatch.setattr(streamed, "SHARD_BYTES", 20_000)  # many shards, the same tensors
    recipe = dataclasses.replace(RECIPES["tiny-flux"], name="x", streamed=("transformer", "text_encoder_2"))
    again = build_preset(recipe, tmp_path / "again")
    shards = sorted((again / "transformer").glob("*.safetensors"))
    assert len(shards) > 3
    from safetensors.torch import load_file

    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    for name in ("transformer", "text_encoder_2"):
        a, b = tensors(streamed_flux / name), tensors(again / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    unstreamed = {k: v for k, v in _digests(streamed_flux).items() if not k.startswith(("transformer/", "text_encoder_2/"))}
    assert unstreamed == {k: v for k, v in _digests(again).items() if k in unstreamed}


def test_flux_arch_is_the_full_transformer_and_t5_xxl():
    import diffusers
    from transformers import T5Config, T5EncoderModel

    recipe = RECIPES["flux-arch"]
    assert recipe.streamed == ("transformer", "text_encoder_2") and recipe.streamed_dtype == "bfloat16"
    with torch.device("meta"):
        transformer = getattr(diffusers, recipe.transformer_class)(**recipe.transformer)
        t5 = T5EncoderModel(T5Config(vocab_size=2000, **recipe.t5))
    plan = streamed.tensor_plan(transformer)
    assert round(sum(np.prod(s) for _, s, _, _ in plan) / 1e9, 2) == 11.9  # FLUX.1-dev: 11.9B
    # T5-XXL: 4.76B with its 32,128-token vocabulary; the toy tokenizer has 2,000
    assert round(sum(np.prod(s) for _, s, _, _ in streamed.tensor_plan(t5)) / 1e9, 2) == 4.64
    assert max(np.prod(s) for _, s, _, _ in plan) * 2 < streamed.SHARD_BYTES  # one tensor always fits a shard


def test_a_pipeline_that_cannot_fit_is_refused_before_loading(streamed_flux, monkeypatch):
    from safetensors.torch import load_file

    from diffship.errors import SourceError
    from diffship.reference import memory
    from diffship.reference.loader import load

    values = sum(t.numel() for f in streamed_flux.rglob("*.safetensors") for t in load_file(f).values())
    assert memory.loading_bytes(streamed_flux) == 4 * values  # bf16 on disk, float32 once loaded
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 4 * values - 1)
    with pytest.raises(SourceError, match=r"takes 0\.\d GB of memory once loaded .* cannot be loaded whole here"):
        load(streamed_flux)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 4 * values)
    assert load(streamed_flux).transformer is not None

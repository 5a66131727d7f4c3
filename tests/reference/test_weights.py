"""Modules built empty and their stored weights (what a streamed export traces and copies from)."""

from __future__ import annotations

import torch

from diffship.reference import ShapeProfile, load
from diffship.reference.loader import load_with_info, stored_weights
from diffship.reference.weights import StoredWeights, is_empty, materialized, streamed_copy


def test_empty_modules_hold_no_weights_and_the_buffers_loading_gives(tmp_path):
    """Parameters on the meta device; buffers as a normal load has them: computed ones (CLIP's position ids)
    and stored ones (SD3's positional embedding, here made to differ from what the class computes); T5's
    encoder embeddings tied to its shared ones, as from_pretrained ties them."""
    import shutil

    from safetensors.torch import load_file, save_file

    from diffship.reference import preset_path

    source = tmp_path / "sd3"
    shutil.copytree(preset_path("tiny-sd3"), source)
    file = source / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["pos_embed.pos_embed"] = state["pos_embed.pos_embed"] * 0.5
    save_file(state, file, metadata={"format": "pt"})
    empty, info = load_with_info(source, stream=True)
    full = load(source)
    assert torch.equal(full.transformer.pos_embed.pos_embed, state["pos_embed.pos_embed"])
    stored = stored_weights(empty, info)
    assert set(stored) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"}
    for name, weights in stored.items():
        module, loaded = getattr(empty, name), getattr(full, name)
        assert is_empty(module) and all(p.is_meta for p in module.parameters())
        assert weights.covers(module)
        buffers, expected = dict(module.named_buffers()), dict(loaded.named_buffers())
        assert set(buffers) == set(expected) and all(torch.equal(buffers[k], expected[k]) for k in expected)
    t5 = empty.text_encoder_3
    assert t5.shared.weight is t5.encoder.embed_tokens.weight


def test_stored_weights_read_as_loading_and_converting_would():
    """Each weight read from its file equals the loaded parameter, and converted to fp16/bf16 it equals the
    loaded parameter converted (the bytes a normal reduced-precision export writes)."""
    empty, info = load_with_info("tiny", stream=True)
    full = load("tiny")
    weights = StoredWeights(info.path + "/text_encoder", empty.text_encoder)
    for name, param in full.text_encoder.named_parameters():
        assert torch.equal(weights.read(name), param)
        for dtype in (torch.float16, torch.bfloat16):
            read = weights.read(name, dtype)
            assert read.dtype == dtype and torch.equal(read, param.to(dtype))


def test_a_streamed_copy_traces_without_weights_and_materializes_to_the_module():
    """The copy's parameters are fake (no storage) in the asked dtype; read into a module, it computes what the
    loaded module computes."""
    from torch._subclasses.fake_tensor import FakeTensor

    from diffship.reference.pipelines import specs_for_pipeline

    empty, info = load_with_info("tiny", stream=True)
    full = load("tiny")
    spec = next(s for s in specs_for_pipeline(full) if s.name == "unet")
    module, feed = streamed_copy(spec.wrapper(empty.unet).eval(), empty.unet, stored_weights(empty, info)["unet"],
                                 torch.float16)
    assert all(isinstance(p, FakeTensor) and p.dtype == torch.float16 for p in module.parameters())
    assert set(feed) == {n for n, _ in module.named_parameters()}
    real = materialized(module, feed).float()
    inputs = spec.example_inputs(ShapeProfile(height=64, width=64), "fp32")
    with torch.no_grad():
        expected = spec.wrapper(full.unet).eval().half().float()(*inputs.values())
        assert torch.equal(real(*inputs.values()), expected)

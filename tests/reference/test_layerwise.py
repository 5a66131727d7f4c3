"""Eager runs of a module built empty, its weights read layer by layer as it is called."""

from __future__ import annotations

import pytest
import torch

from diffship.reference import load
from diffship.reference.layerwise import weights_on_call
from diffship.reference.loader import load_with_info, stored_weights
from diffship.reference.pipelines import specs_for_pipeline
from diffship.reference.shapes import ShapeProfile


@pytest.fixture(scope="module")
def empty_flux():
    pipe, info = load_with_info("tiny-flux", stream=True)
    return pipe, stored_weights(pipe, info)


def test_every_component_computes_what_the_loaded_one_does(empty_flux):
    pipe, stored = empty_flux
    loaded = load("tiny-flux")
    for spec in specs_for_pipeline(loaded):
        inputs = spec.example_inputs(ShapeProfile(height=64, width=48))
        want = spec.eager(getattr(loaded, spec.source))(inputs)
        module = getattr(pipe, spec.source)
        with weights_on_call(module, stored[spec.source]):
            got = spec.eager(module)(inputs)
        assert all(torch.equal(want[k], got[k]) for k in want), spec.name
        assert all(p.is_meta for p in module.parameters()), f"{spec.name}: weights kept after the call"


def test_each_layer_holds_its_weights_only_during_its_call_and_a_failed_call_restores_them(empty_flux):
    pipe, stored = empty_flux
    module, spec = pipe.transformer, next(s for s in specs_for_pipeline(pipe) if s.name == "transformer")
    held = []
    read = stored["transformer"].read

    def watched(name, dtype=None):
        held.append(sum(not p.is_meta for p in module.parameters()))
        return read(name, dtype)

    stored["transformer"].read = watched
    try:
        inputs = spec.example_inputs(ShapeProfile(height=64, width=64))
        with weights_on_call(module, stored["transformer"]):
            spec.eager(module)(inputs)
        assert held and max(held) <= 4  # a layer's own few parameters (weight, bias; RMSNorm scales), never the model's
        with pytest.raises(RuntimeError), weights_on_call(module, stored["transformer"]):
            spec.eager(module)({**inputs, "hidden_states": inputs["hidden_states"][..., :3]})
        assert all(p.is_meta for p in module.parameters())
    finally:
        del stored["transformer"].read

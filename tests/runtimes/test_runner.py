"""Input checking shared by every runner, and the ONNX Runtime provider choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffship.backends.manifest import ComponentEntry, TensorIO
from diffship.backends.onnx import OnnxDetails
from diffship.errors import MissingBackendError, ShapeError
from diffship.runtimes.base import Runner

INPUTS = (TensorIO("sample", "float16", ["batch", 4, "latent_height", "latent_width"]),
          TensorIO("timestep", "float32", ["batch"]))


def entry(outputs=(TensorIO("out", "float16", ["batch", 4, "h", "w"]),)) -> ComponentEntry:
    return ComponentEntry(component="unet", source="unet", precision="fp16", files=[], inputs=INPUTS, outputs=outputs,
                          details=OnnxDetails(opset=18, external_data=False))


class Echo(Runner):
    def _run(self, feeds):
        return {"out": feeds["sample"]}


def runner():
    return Echo(".", entry())


def test_inputs_are_cast_to_declared_dtypes():
    out = runner().infer({"sample": torch.randn(2, 4, 8, 8, dtype=torch.float64), "timestep": np.array([1, 2])})
    assert out["out"].dtype == torch.float16 and out["out"].shape == (2, 4, 8, 8)
    checked = runner().check_inputs({"sample": np.zeros((1, 4, 2, 2)), "timestep": [3]})
    assert checked["timestep"].dtype == np.float32 and checked["timestep"].flags.c_contiguous


@pytest.mark.parametrize("feeds, message", [
    ({"sample": np.zeros((1, 4, 8, 8))}, r"expected inputs \['sample', 'timestep'\], got \['sample'\]"),
    ({"sample": np.zeros((1, 4, 8, 8)), "timestep": [1], "extra": [1]}, "expected inputs"),
    ({"sample": np.zeros((1, 4, 8)), "timestep": [1]}, r"has shape \(1, 4, 8\), expected 4 dims"),
    ({"sample": np.zeros((1, 3, 8, 8)), "timestep": [1]}, r"axis 1 is fixed at 4"),
    ({"sample": np.zeros((2, 4, 8, 8)), "timestep": [1]}, r"dim 'batch' is 2 in sample but 1 in timestep"),
])
def test_bad_inputs_are_refused(feeds, message):
    with pytest.raises(ShapeError, match=message):
        runner().infer(feeds)


def test_shape_note_is_appended():
    r = runner()
    r.shape_note = " -- this export is static: 64x64 images"
    with pytest.raises(ShapeError, match="static: 64x64 images; re-export"):
        r.infer({"sample": np.zeros((1, 5, 8, 8)), "timestep": [1]})


@pytest.mark.onnx
def test_unavailable_provider_names_the_extra():
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    import onnxruntime as ort

    from diffship.runtimes.onnxruntime import providers_for

    assert providers_for(None) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the refusal cannot be shown here")
    with pytest.raises(MissingBackendError, match=r"pip uninstall onnxruntime && pip install .diffship\[onnx-gpu\]."):
        providers_for("cuda")


@pytest.mark.onnx
def test_ort_runner_options(export_dir):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from diffship.runtimes.pipeline import open_export

    loaded = open_export(export_dir("onnx"), threads=1, session_config={"session.intra_op.allow_spinning": "0"})
    session = loaded.runners["unet"].session
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert "CPUExecutionProvider" in loaded.runners["unet"].describe()


def test_backend_exceptions_become_one_diffship_error():
    from diffship.errors import RuntimeFailure

    class Broken(Echo):
        def _run(self, feeds):
            raise ValueError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad input\nsecond line")

    r = Broken(".", entry(outputs=()))
    with pytest.raises(RuntimeFailure, match=r"running unet on Broken failed: \[ONNXRuntimeError\].*bad input; re-run"):
        r.infer({"sample": np.zeros((1, 4, 8, 8)), "timestep": [1]})


@pytest.mark.onnx
def test_unknown_provider_and_option_names(export_dir):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from diffship.errors import DiffshipError
    from diffship.runtimes.onnxruntime import providers_for
    from diffship.runtimes.pipeline import load_pipeline

    with pytest.raises(DiffshipError, match=r"unknown onnxruntime provider 'cdua'; use one of cpu, cuda"):
        providers_for("cdua")
    with pytest.raises(DiffshipError, match=r"unknown onnx runtime option\(s\) thread; it takes: device, threads"):
        load_pipeline(export_dir("onnx"), thread=2)


@pytest.mark.parametrize("dims, want", [([], ()), ([1], (1,))])
def test_a_one_value_timestep_takes_rows_that_share_it(dims, want):
    """optimum's UNet takes one timestep (a scalar, or one element) while diffusers passes one per row."""
    shared = Echo(".", ComponentEntry(component="unet", source="unet", precision="fp32", files=[],
                                      inputs=(INPUTS[0], TensorIO("timestep", "float32", dims)),
                                      outputs=entry().outputs, details=OnnxDetails(opset=18, external_data=False)))
    sample = np.zeros((2, 4, 2, 2))
    checked = shared.check_inputs({"sample": sample, "timestep": torch.tensor([981.0, 981.0])})
    assert checked["timestep"].shape == want and float(checked["timestep"].reshape(-1)[0]) == 981.0
    with pytest.raises(ShapeError, match="input timestep has shape \\(2,\\)"):
        shared.check_inputs({"sample": sample, "timestep": torch.tensor([981.0, 961.0])})

"""Streamed exports: weights copied from the source's files as they are written, the modules traced empty.

The session's shared exports (``export_dir``, ``cli_export``) stream, as every ONNX and OpenVINO export of a
folder does by default; these tests compare them with exports of the loaded pipeline (``stream=False``).
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest

pytestmark = pytest.mark.onnx
onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")

from diffship._files import sha256_file  # noqa: E402
from diffship.backends.manifest import read_manifest  # noqa: E402
from diffship.errors import DiffshipError  # noqa: E402
from diffship.parity.compare import ParitySettings, check_parity  # noqa: E402
from diffship.reference import preset_path  # noqa: E402
from diffship.workflows import export_pipeline  # noqa: E402

FAST = ParitySettings(steps=2, tasks=("text2img",))


def graph_weights(path) -> tuple[list[str], list[tuple[str, int, np.ndarray]]]:
    """The graph's op types in order, and every weight as the input it is of each node, in order."""
    import onnx_ir as ir

    graph = ir.load(path).graph
    feeds = [(node.op_type, i, value.const_value.numpy()) for node in graph for i, value in enumerate(node.inputs)
             if value is not None and value.is_initializer()]
    return [node.op_type for node in graph], feeds


def assert_same_graphs_and_weights(a, b) -> None:
    """Every component of ``b`` the same in ``a`` (``b`` may hold fewer)."""
    for component in read_manifest(b).components:
        (ops_a, weights_a), (ops_b, weights_b) = (graph_weights(x / component / "model.onnx") for x in (a, b))
        assert ops_a == ops_b, component
        assert len(weights_a) == len(weights_b), component
        for (op, i, x), (op_b, i_b, y) in zip(weights_a, weights_b):
            assert (op, i, x.dtype, x.shape) == (op_b, i_b, y.dtype, y.shape), component
            assert x.tobytes() == y.tobytes(), f"{component}: {op} input {i}"


def test_streamed_and_loaded_exports_of_tiny_are_identical(export_dir):
    streamed, loaded = export_dir("onnx"), export_dir("onnx", stream=False)
    assert read_manifest(streamed).components.keys() == read_manifest(loaded).components.keys()
    assert_same_graphs_and_weights(streamed, loaded)
    a, b = (check_parity("tiny", x, settings=FAST) for x in (streamed, loaded))
    assert a.passed and b.passed
    metrics = [[(o.name, o.metrics.max_abs, o.metrics.psnr) for o in c.outputs] for c in a.components]
    assert metrics == [[(o.name, o.metrics.max_abs, o.metrics.psnr) for o in c.outputs] for c in b.components]
    assert [i.metrics.psnr for i in a.images] == [i.metrics.psnr for i in b.images]


def test_streamed_and_loaded_exports_of_tiny_sdxl_are_identical(cli_export, tmp_path):
    """The second text encoder (with projection), the SDXL UNet's added conditions; the UNet in fp16 too, where
    the fp16 probe runs on the streamed weights read into a module. (The VAE and CLIP-L stream as tiny's do.)"""
    assert_same_graphs_and_weights(cli_export("tiny-sdxl", "onnx"),
                                   export_pipeline("tiny-sdxl", tmp_path / "loaded", backend="onnx", stream=False,
                                                   components=["text_encoder_2", "unet"]) and tmp_path / "loaded")
    for stream in (True, False):
        export_pipeline("tiny-sdxl", tmp_path / f"fp16-{stream}", backend="onnx", precision="fp16", stream=stream,
                        components=["unet"])
    assert_same_graphs_and_weights(tmp_path / "fp16-True", tmp_path / "fp16-False")


def test_each_large_weight_is_read_once_when_written_and_released(tmp_path, monkeypatch):
    """Nothing reads a weight of more than 8192 values before the file is written (the optimizer's constant
    folding reads no larger tensor; the Transposes it would fold are written transposed), none twice, and no
    two are alive at once: memory holds one tensor, whatever the model's size."""
    from diffship.reference import weights

    reads, alive, most = [], set(), [0]
    read = weights.StoredWeights.read

    def watched(self, name, dtype=None):
        import traceback

        tensor = read(self, name, dtype)
        if tensor.numel() > 8192:
            reads.append((name, any(f.name == "_write_external_data" or f.name == "serialize_model"
                                    for f in traceback.extract_stack())))
            alive.add(id(tensor))
            most[0] = max(most[0], len(alive))
            weakref.finalize(tensor, alive.discard, id(tensor))
        return tensor

    monkeypatch.setattr(weights.StoredWeights, "read", watched)
    export_pipeline("tiny", tmp_path / "out", backend="onnx", components=["text_encoder", "unet"],
                    backend_options={"external_data": True})
    assert reads and all(writing for _, writing in reads)
    assert len({name for name, _ in reads}) == len(reads)
    assert most[0] == 1


def test_kept_torch_modules_are_copied_from_the_source(export_dir):
    """A ``--component`` export keeps the other modules in torch: a streamed export never loaded them, so it
    copies their files from the source instead of saving them."""
    out = export_dir("onnx", components=("unet",))
    source = preset_path("tiny")
    for module, file in (("text_encoder", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        assert sha256_file(out / module / file) == sha256_file(source / module / file)
    from diffship.runtimes.pipeline import load_pipeline

    pipe = load_pipeline(out)
    image = pipe("a cat", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("backend, precision, why", [
    ("coreml", "fp32", "converts a module that holds its weights"),
    ("openvino", "hybrid-int8", "calibrates on eager runs"),
])
def test_streaming_is_refused_where_it_cannot_be_done(tmp_path, backend, precision, why):
    with pytest.raises(DiffshipError, match=f"cannot stream.*{why}.*without --stream"):
        export_pipeline("tiny", tmp_path / "out", backend=backend, precision=precision, stream=True)
    assert not (tmp_path / "out").exists()


def test_an_opset_below_18_is_exported_from_the_loaded_pipeline(tmp_path):
    """The exporter writes opset 18; onnx's converter to 17 serializes the whole model with its weights, so
    such an export loads the pipeline (and ``--stream`` is refused, saying why)."""
    with pytest.raises(DiffshipError, match="cannot stream.*opset 17 goes through onnx's version converter"):
        export_pipeline("tiny", tmp_path / "out", backend="onnx", stream=True, backend_options={"opset": 17})
    export_pipeline("tiny", tmp_path / "out", backend="onnx", components=["vae_decoder"], backend_options={"opset": 17})
    model = onnx.load(tmp_path / "out" / "vae_decoder" / "model.onnx", load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]


def test_a_single_file_checkpoint_cannot_stream(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(DiffshipError, match="single-file checkpoint is converted.*without --stream"):
        export_pipeline(checkpoint, tmp_path / "out", backend="onnx", stream=True)


def reduced_source(folder, dtype):
    """tiny with its UNet stored in ``dtype``, as large checkpoints are (diffusers loads it as float32)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(preset_path("tiny"), folder)
    file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    import torch

    return reduced_source(tmp_path_factory.mktemp("bf16") / "tiny-bf16", torch.bfloat16)


def test_a_bf16_checkpoint_streams_as_it_loads(bf16_source, tmp_path):
    """ONNX fp32 from bf16 weights: the same bytes whether loaded (float32) or streamed."""
    for stream in (True, False):
        export_pipeline(bf16_source, tmp_path / str(stream), backend="onnx", components=["unet"], stream=stream)
    assert_same_graphs_and_weights(tmp_path / "True", tmp_path / "False")


@pytest.mark.openvino
def test_openvino_streams_an_fp16_checkpoint_as_loading_it_would(tmp_path):
    """The fp16-stored weights are converted to the fp32 a loaded pipeline holds as they are written."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    import torch

    source = reduced_source(tmp_path / "tiny-fp16", torch.float16)
    out = tmp_path / "ov"
    export_pipeline(source, out, backend="openvino", components=["unet", "vae_decoder"])
    report = check_parity(str(source), out, settings=FAST)
    assert report.passed, report.failures()
    assert max(o.metrics.max_abs for c in report.components for o in c.outputs) <= 1e-4

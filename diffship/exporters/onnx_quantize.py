"""``full-int8`` on ONNX: ONNX Runtime's static quantization of the exported denoiser (and VAE decoder,
where it passes), in QDQ format.

8-bit per-channel symmetric weights and asymmetric unsigned 8-bit activations (U8S8, what ONNX Runtime's
x86 integer kernels take) on every Conv, MatMul and Gemm, ranges from the recorded eager calls (min/max),
with the layer groups that cost the most PSNR left float (measured: :mod:`diffship.exporters.quantization`).
The QDQ graph stays a standard ONNX graph; ONNX Runtime fuses each QuantizeLinear -> op -> DequantizeLinear
into its integer kernel when it loads it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from diffship.backends.onnx import MODEL_FILE, ONNX
from diffship.backends.quantized import Floor
from diffship.errors import ExportError, first_line
from diffship.exporters import quantization
from diffship.exporters.base import quiet_export

_KINDS = {"Conv": "conv", "MatMul": "matmul", "Gemm": "matmul"}
#: producers through which a weight reaches its product (the exporter leaves large weights' transposes).
_WEIGHT_PATH = ("Transpose", "Cast", "Identity")


def precise_nodes(model) -> set[str]:
    """Names of the nodes the graph's sines and cosines are computed from (timestep frequencies, Flux's
    rotary embedding): quantizing their products turns large angles into wrong phases, so they stay float
    (as on OpenVINO: :func:`diffship.exporters.ov_weights.precise_nodes`)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    return quantization.upstream([node for node in model.graph.node if node.op_type in ("Sin", "Cos")],
                                 lambda node: node.name, lambda node: [producers[i] for i in node.input if i in producers])


def quant_nodes(model) -> list[quantization.QuantNode]:
    """The graph's Conv / MatMul / Gemm nodes as QuantNode records; the module path comes from the
    exporter's ``namespace`` metadata (``: Wrapper/unet: UNet2DConditionModel/unet.conv_in: Conv2d/conv2d: ...``)."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "Constant":
            weights.update(node.output)

    def is_weight(name: str, depth: int = 0) -> bool:
        if name in weights:
            return True
        node = producers.get(name)
        return bool(node and depth < 2 and node.op_type in _WEIGHT_PATH and is_weight(node.input[0], depth + 1))

    nodes = []
    for node in graph.node:
        kind = _KINDS.get(node.op_type)
        if kind is None:
            continue
        if kind == "matmul" and not any(is_weight(i) for i in node.input[:2]):
            kind = "scores"
        meta = {p.key: p.value for p in node.metadata_props}
        # scopes: the wrapper, then each module by its full name from the wrapper ("unet.conv_in"), the op
        scopes = [part.split(":")[0].strip() for part in meta.get("namespace", "").split("/")]
        path = tuple(scopes[-2].split(".")[1:]) if len(scopes) > 2 else ()
        nodes.append(quantization.QuantNode(node.name, kind, path))
    return nodes


class _Reader:
    """ONNX Runtime's calibration data reader over recorded calls (its ``CalibrationDataReader`` protocol)."""

    def __init__(self, calls: list[dict[str, np.ndarray]]):
        self._calls = iter(calls)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._calls, None)


def _feeds(graph, calibration: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """The recorded calls as numpy feeds of the graph's input dtypes."""
    from onnx import helper

    dtypes = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph.input}
    return [{k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtypes[k]) for k, v in call.items() if k in dtypes}
            for call in calibration]


def quantize(path: Path, calibration: list[dict[str, Any]], keep: tuple[str, ...] | None, external: bool,
             progress: Callable[[str], None] | None = None, floor: Floor | None = None) -> quantization.Choice:
    """Replace the ONNX graph at ``path`` (and its external data) by its full-int8 QDQ graph, unless the
    choice (:func:`~diffship.exporters.quantization.choose` with ``floor``) did not pass."""
    ONNX.require(runtime=True)
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)  # the graph; its weights stay in their file
    feeds = _feeds(model.graph, calibration)
    calibrate, scored = quantization.split_calls(feeds)

    def run(model: Path) -> list[np.ndarray]:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        return [out for call in scored for out in session.run(None, call)]

    def write(float_nodes: set[str], data: list[dict[str, np.ndarray]], folder: Path) -> Path:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        out = folder / MODEL_FILE
        try:
            with quiet_export():
                quantize_static(str(path), str(out), _Reader(data), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(_KINDS), per_channel=True, reduce_range=False,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=sorted(float_nodes), use_external_data_format=external)
        except Exception as exc:
            raise ExportError(f"quantizing {path.parent.name} with ONNX Runtime failed ({type(exc).__name__}): "
                              f"{first_line(exc)}; export with --precision fp32 or re-run with --debug") from exc
        return out

    def score(float_nodes: set[str]) -> float:
        with tempfile.TemporaryDirectory(prefix="diffship-quantize-") as folder:
            return quantization.psnr(expected, run(write(float_nodes, calibrate, Path(folder))),
                                     floor.value_range if floor else None)

    expected = run(path) if keep is None else []
    precise = precise_nodes(model)
    choice, float_nodes = quantization.choose(quant_nodes(model), keep, lambda names: score(names | precise), progress,
                                              floor.db if floor else None)
    if not choice.passed:
        return choice
    float_nodes |= precise
    # the final graph is written beside the float one (same folder: same disk), then replaces it
    staging = Path(tempfile.mkdtemp(prefix=".quantized-", dir=path.parent.parent))
    try:
        write(float_nodes, feeds, staging)
        for old in path.parent.glob(f"{MODEL_FILE}*"):
            old.unlink()
        for new in staging.iterdir():
            shutil.move(str(new), path.parent / new.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return choice

"""Streamed OpenVINO exports: weights written into the IR one at a time, never held together.

OpenVINO converts a module that holds its weights: its TorchScript frontend makes each one a constant,
and ``save_model`` reads them all. Here a module built empty is converted with its weights as the graph's
trailing *inputs* instead: the trace runs on placeholders that take no memory (one zero expanded to each
weight's shape), the weight format is applied to those inputs as graph ops (fp16: a Convert; int8: NNCF's
decompression subgraph, its values from NNCF's own quantizer), and the model is saved with them as
Parameters. Each such Parameter is then made a ``Const`` in the IR's XML whose data is appended to its
``.bin`` as the weight is read from the source's file and converted: one weight in memory at a time,
as ONNX's streamed export holds. The values are the ones a normal export writes (tests compare each
constant of both exports by name).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

#: tensor names of the weight inputs carry this prefix until they are made constants
_MARK = "diffship.weight:"
#: where each constant's data starts in the ``.bin`` (bytes)
_ALIGN = 64
#: ops whose weight input NNCF's 8-bit weight compression takes: op -> the port of the weight
_COMPRESSIBLE = {"MatMul": 1, "Convolution": 1, "Gather": 0}


#: the attribute the module is traced under; its scope is dropped from the converted nodes' names
_HELD = "held"


class _WeightsAsInputs(nn.Module):
    """``module`` called with its parameters taken from the trailing inputs (in ``named_parameters``
    order), so a trace records them as graph inputs rather than constants.

    ``torch.func.functional_call`` refuses TorchScript tracing; this swaps each parameter slot (every name
    of a tied one) for the call and restores it after. The module's own parameters are placeholders that
    hold no memory (the trace keeps them as attributes, unused).
    """

    def __init__(self, module: nn.Module, count: int):
        super().__init__()
        self.count = count
        index = {id(p): i for i, (_, p) in enumerate(module.named_parameters())}
        self.slots = [(module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], index[id(p)])
                      for name, p in module.named_parameters(remove_duplicate=False)]
        setattr(self, _HELD, module)

    def forward(self, *args):
        saved = [(owner, attr, owner._parameters[attr]) for owner, attr, _ in self.slots]
        try:
            for owner, attr, i in self.slots:
                owner._parameters[attr] = args[self.count + i]
            return getattr(self, _HELD)(*args[:self.count])
        finally:
            for owner, attr, value in saved:
                owner._parameters[attr] = value


def traceable(module: nn.Module, count: int) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str]]:
    """``module`` (a streamed copy, its parameters without storage) as a module taking its weights after
    its ``count`` inputs, its floating buffers in float32; the weights' placeholders (float32, one zero each,
    expanded: no memory); their names."""
    from diffship.reference.weights import materialized

    named = list(module.named_parameters())
    placeholders = tuple(torch.zeros((), dtype=torch.float32 if p.is_floating_point() else p.dtype).expand(p.shape)
                         for _, p in named)
    module = materialized(module, {name: (lambda x=x: x) for (name, _), x in zip(named, placeholders)})
    for owner in module.modules():  # traced in fp32 whatever the compute precision: fp16 is a weight format
        for key, buffer in owner._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                owner._buffers[key] = buffer.float()
    return _WeightsAsInputs(module, count), placeholders, [name for name, _ in named]


def plain_names(model) -> None:
    """Name the converted nodes as a conversion of the module itself names them (``__module.unet.conv_in/...``,
    which the layer groups of ``f32_groups`` and full-int8 read), without the wrapper's scope."""
    prefix = f"__module.{_HELD}."
    for op in model.get_ops():
        name = op.get_friendly_name()
        if name.startswith(prefix):
            op.set_friendly_name("__module." + name[len(prefix):])


@dataclass
class Weight:
    """One weight input of a converted model, and how its values are written.

    Attributes:
        name: the parameter's name in the module.
        format: ``f32``, ``f16``, ``int8`` or ``int4`` (NNCF's asymmetric weights: ``tensor``, ``zero_point``
            and ``scale`` inputs, the scales reduced over ``axes``; int4 in groups of ``group`` input channels).
        tensors: the model's input tensor name per part written (``value``, or the three integer parts).
        axes: the axes integer scales reduce over (the input channels).
        group: int4's input channels per scale.
    """

    name: str
    format: str = "f32"
    tensors: dict[str, str] = field(default_factory=dict)
    axes: tuple[int, ...] = ()
    group: int = -1


def streamed_weight(output) -> bool:
    """Whether a model's input tensor ``output`` is a weight :func:`write_weights` turns into a constant."""
    return any(name.startswith(_MARK) for name in output.get_names())


def weight_inputs(model, names: list[str], count: int) -> list[Weight]:
    """Name the weight inputs of a converted ``model`` (those after its first ``count``) as the normal
    export names its constants (``self.<name>``), marked for :func:`write_weights`."""
    weights = []
    for param, name in zip(model.get_parameters()[count:], names):
        tensor = f"{_MARK}{name}"
        param.set_friendly_name(f"self.{name}")
        param.get_output_tensor(0).set_names({tensor})
        weights.append(Weight(name=name, tensors={"value": tensor}))
    return weights


def apply_format(model, weights: list[Weight], precision: str, precise: set[str]) -> str | None:
    """Give the weight inputs of ``model`` the weight format of ``precision`` (``fp32``, ``fp16``, ``int8``,
    ``int4``) as the normal exporter gives its constants: fp16 to every weight of more than one element;
    8 bits (NNCF's data-free asymmetric mode) to the weights of matrix products, convolutions and
    embeddings; 4 bits to the matrix products NNCF gives them (:func:`_choose_int4`); none to a weight a
    ``precise`` node (sines and cosines) reads. Returns, for int4, how many weights got 4 and 8 bits."""
    params = {p.get_friendly_name(): p for p in model.get_parameters()}
    consumers = {}
    for weight in weights:
        targets = list(params[f"self.{weight.name}"].output(0).get_target_inputs())
        if any(t.get_node().get_friendly_name() in precise for t in targets):
            continue
        shape = list(params[f"self.{weight.name}"].get_output_shape(0))
        axes = _reduction_axes(targets, len(shape)) if precision in ("int8", "int4") else None
        if axes is not None:
            weight.format, weight.axes = "int8", axes
            consumers[weight.name] = targets[0].get_node()
        elif precision == "fp16" and int(np.prod(shape)) > 1:
            weight.format = "f16"
    if precision == "int4":
        _choose_int4(model, [w for w in weights if w.format == "int8"], consumers, params)
    for weight in weights:
        if weight.format != "f32":
            _decompressed(model, params[f"self.{weight.name}"], weight)
    model.validate_nodes_and_infer_types()
    if precision != "int4":
        return None
    from diffship.exporters.ov_weights import INT4_GROUP

    counts = [sum(w.format == kind for w in weights) for kind in ("int4", "int8")]
    return f"{counts[0]} weights 4-bit (groups of up to {INT4_GROUP}), {counts[1]} 8-bit"


def _choose_int4(model, weights: list[Weight], consumers: dict, params: dict) -> None:
    """NNCF's choice of 4-bit weights at ratio 1 (``compress_weights(mode=INT4_ASYM, ratio=1.0)``): every
    matrix product's weight but the last one's in graph order; in groups of ``INT4_GROUP`` input channels,
    or, where that does not divide them, the largest power of two that does (NNCF's ADJUST), down to 32.
    Convolutions, embeddings, the last matrix product and weights no group fits stay 8-bit."""
    from diffship.exporters.ov_weights import INT4_GROUP, MIN_INT4_GROUP

    order = {op.get_friendly_name(): i for i, op in enumerate(model.get_ordered_ops())}
    products = sorted((w for w in weights if consumers[w.name].get_type_name() == "MatMul"),
                      key=lambda w: order[consumers[w.name].get_friendly_name()])
    for weight in products[:-1]:
        channels = params[f"self.{weight.name}"].get_output_shape(0)[weight.axes[0]]
        group = INT4_GROUP if channels % INT4_GROUP == 0 else channels & -channels
        if group >= MIN_INT4_GROUP:
            weight.format, weight.group = "int4", group


def _decompressed(model, param, weight: Weight) -> None:
    """Replace the weight input ``param`` by inputs in ``weight``'s format and the ops that make the float32
    weight of them (NNCF's decompression subgraph for the integer formats, named as NNCF names it)."""
    import openvino as ov
    import openvino.opset13 as ops

    targets = list(param.output(0).get_target_inputs())
    shape = list(param.get_output_shape(0))
    own = f"self.{weight.name}"
    if weight.format == "f16":
        inputs = {"value": ops.parameter(shape, ov.Type.f16, name=own)}
        values = ops.convert(inputs["value"], ov.Type.f32)
    else:
        stored, reduced = _integer_shapes(shape, weight)
        kind = ov.Type.u4 if weight.format == "int4" else ov.Type.u8
        inputs = {"tensor": ops.parameter(stored, kind, name=own),
                  "zero_point": ops.parameter(reduced, kind, name=f"{own}/zero_point"),
                  "scale": ops.parameter(reduced, ov.Type.f16, name=f"{own}/scale")}
        values = ops.subtract(ops.convert(inputs["tensor"], ov.Type.f16), ops.convert(inputs["zero_point"], ov.Type.f16),
                              name=f"{own}/zero_point/subtract")
        port = targets[0].get_index()
        values = ops.multiply(values, inputs["scale"], name=f"{own}/fq_weights_{port}")
        if weight.group > 0:
            values = ops.reshape(values, ops.constant(np.array(shape, dtype=np.int64)), special_zero=False)
        values = ops.convert(values, ov.Type.f32, name=f"{own}/fq_weights_{port}/convert")
    weight.tensors = {}
    for part, node in inputs.items():
        weight.tensors[part] = f"{_MARK}{weight.name}:{part}"
        node.get_output_tensor(0).set_names({weight.tensors[part]})
    for target in targets:
        target.replace_source_output(values.output(0))
    model.replace_parameter(model.get_parameters().index(param), inputs.popitem()[1])
    model.add_parameters(list(inputs.values()))


def _integer_shapes(shape: list[int], weight: Weight) -> tuple[list[int], list[int]]:
    """The stored integer weight's shape (int4: the reduced axis split into groups, as NNCF stores it) and its
    scales' and zero points' (one per output channel, or per group)."""
    if weight.group > 0:
        axis = weight.axes[0]
        shape = shape[:axis] + [shape[axis] // weight.group, weight.group] + shape[axis + 1:]
        return shape, [1 if i == axis + 1 else d for i, d in enumerate(shape)]
    return shape, [1 if i in weight.axes else d for i, d in enumerate(shape)]


def _reduction_axes(targets, rank: int) -> tuple[int, ...] | None:
    """The axes NNCF reduces a weight's scales over (its input channels), or None where NNCF does not
    compress it (another consumer, another port, a weight of one dimension)."""
    if len(targets) != 1 or rank < 2:
        return None
    node, port = targets[0].get_node(), targets[0].get_index()
    kind = node.get_type_name()
    if _COMPRESSIBLE.get(kind) != port:
        return None
    if kind == "MatMul":
        transposed = node.get_attributes()["transpose_b"]
        return (rank - 1,) if transposed else (rank - 2,)
    if kind == "Gather":
        return (1,) if rank == 2 else None
    return tuple(range(1, rank))  # a convolution's weight: [out, in, kernel...]


def _values(weight: Weight, read: Callable[[], torch.Tensor]) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
    """The bytes written for ``weight`` and the shape they hold, by part, from its float32 value (integer
    parts computed by NNCF's own quantizer; 4-bit values packed two to a byte, the first in the low half)."""
    value = read().detach().to(torch.float32).contiguous().numpy()
    if weight.format == "f16":
        value = value.astype(np.float16)
    if weight.format not in ("int8", "int4"):
        return {"value": (value, value.shape)}
    from nncf.parameters import CompressWeightsMode
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig
    from nncf.quantization.algorithms.weight_compression.weight_lowering import compress_weight
    from nncf.tensor import Tensor

    mode = CompressWeightsMode.INT4_ASYM if weight.format == "int4" else CompressWeightsMode.INT8_ASYM
    packed = compress_weight(Tensor(value), weight.axes, WeightCompressionConfig(mode=mode, group_size=weight.group))
    parts = {"tensor": np.asarray(packed.tensor.data, dtype=np.uint8),
             "zero_point": np.asarray(packed.zero_point.data, dtype=np.uint8),
             "scale": np.asarray(packed.scale.data, dtype=np.float32).astype(np.float16)}
    return {part: (_nibbles(a) if weight.format == "int4" and part != "scale" else a, a.shape)
            for part, a in parts.items()}


def _nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit values as OpenVINO stores ``u4``: two to a byte, the first in the low four bits."""
    flat = values.ravel()
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] & 0x0F) | (flat[1::2] << 4)


def write_weights(xml: Path, weights: list[Weight], read: Mapping[str, Callable[[], torch.Tensor]]) -> None:
    """Make each marked weight input of the saved IR ``xml`` a constant, appending its values to the
    ``.bin`` beside it one weight at a time (read from ``read[name]``)."""
    tree = ET.parse(xml)
    layers = {}
    for layer in tree.getroot().iter("layer"):
        if layer.get("type") == "Parameter":
            port = layer.find("output/port")
            # (a replaced input passes its names on: a port may carry the old weight name too)
            for name in (port.get("names") or "").split(",") if port is not None else ():
                if name.startswith(_MARK):
                    layers[name] = layer
    with open(xml.with_suffix(".bin"), "ab") as out:
        for weight in weights:
            for part, (array, shape) in _values(weight, read[weight.name]).items():
                layer = layers[weight.tensors[part]]
                data = layer.find("data")
                if tuple(int(d) for d in data.get("shape").split(",") if d) != shape:
                    raise AssertionError(f"{weight.name}: stored shape {shape} is not the traced {data.get('shape')}")
                out.write(b"\0" * (-out.tell() % _ALIGN))
                offset = out.tell()
                out.write(memoryview(np.ascontiguousarray(array)).cast("B"))
                layer.set("type", "Const")
                data.attrib = {"element_type": data.get("element_type"), "shape": data.get("shape"),
                               "offset": str(offset), "size": str(array.nbytes)}
                del layer.find("output/port").attrib["names"]
    if left := sorted(name for name, layer in layers.items() if layer.get("type") == "Parameter"):
        raise AssertionError(f"weight inputs left without values: {', '.join(left)}")
    tree.write(xml, encoding="utf-8", xml_declaration=True)
    _check(xml)


def _check(xml: Path) -> None:
    """Read the rewritten IR back as OpenVINO does (its graph validated, every constant's data in range;
    the weights file is mapped, not read)."""
    import openvino as ov

    model = ov.Core().read_model(xml)
    if any(streamed_weight(p.output(0)) for p in model.get_parameters()):
        raise AssertionError(f"{xml}: a weight is still an input after rewriting")

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
        format: ``f32``, ``f16`` or ``int8`` (NNCF's asymmetric 8-bit weights: ``tensor``, ``zero_point``,
            ``scale`` inputs, reduced over ``axes``).
        tensors: the model's input tensor name per part written (``value``, or the three int8 parts).
        axes: the axes int8 scales reduce over (the input channels).
    """

    name: str
    format: str = "f32"
    tensors: dict[str, str] = field(default_factory=dict)
    axes: tuple[int, ...] = ()


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


def apply_format(model, weights: list[Weight], precision: str, precise: set[str]) -> str:
    """Give the weight inputs of ``model`` the weight format of ``precision`` (``fp32``, ``fp16``,
    ``int8``) as the normal exporter gives its constants: fp16 to every weight of more than one element,
    int8 (NNCF's data-free asymmetric mode) to the weights of matrix products, convolutions and embeddings;
    none to a weight a ``precise`` node (sines and cosines) reads. Returns the precision written."""
    import openvino as ov
    import openvino.opset13 as ops

    params = {p.get_friendly_name(): p for p in model.get_parameters()}
    for weight in weights:
        param = params[f"self.{weight.name}"]
        targets = list(param.output(0).get_target_inputs())
        if any(t.get_node().get_friendly_name() in precise for t in targets):
            continue
        shape = list(param.get_output_shape(0))
        if precision == "int8" and (axes := _reduction_axes(targets, len(shape))) is not None:
            weight.format, weight.axes = "int8", axes
            reduced = [1 if i in axes else d for i, d in enumerate(shape)]
            parts = {"tensor": (ov.Type.u8, shape), "zero_point": (ov.Type.u8, reduced),
                     "scale": (ov.Type.f16, reduced)}
            inputs = {part: ops.parameter(dims, kind, name=_node_name(weight, part)) for part, (kind, dims) in parts.items()}
            values = ops.subtract(ops.convert(inputs["tensor"], ov.Type.f16), ops.convert(inputs["zero_point"], ov.Type.f16),
                                  name=f"self.{weight.name}/zero_point/subtract")
            values = ops.multiply(values, inputs["scale"], name=f"self.{weight.name}/fq_weights_{_port(targets)}")
            values = ops.convert(values, ov.Type.f32, name=f"self.{weight.name}/fq_weights_{_port(targets)}/convert")
        elif precision == "fp16" and int(np.prod(shape)) > 1:
            weight.format = "f16"
            inputs = {"value": ops.parameter(shape, ov.Type.f16, name=f"self.{weight.name}")}
            values = ops.convert(inputs["value"], ov.Type.f32)
        else:
            continue
        weight.tensors = {}
        for part, node in inputs.items():
            weight.tensors[part] = f"{_MARK}{weight.name}:{part}"
            node.get_output_tensor(0).set_names({weight.tensors[part]})
        for target in targets:
            target.replace_source_output(values.output(0))
        model.replace_parameter(model.get_parameters().index(param), inputs.popitem()[1])
        model.add_parameters(list(inputs.values()))
    model.validate_nodes_and_infer_types()
    return precision


def _node_name(weight: Weight, part: str) -> str:
    return f"self.{weight.name}" if part == "tensor" else f"self.{weight.name}/{part}"


def _port(targets) -> int:
    return targets[0].get_index()


def _reduction_axes(targets, rank: int) -> tuple[int, ...] | None:
    """The axes NNCF reduces a weight's 8-bit scales over (its input channels), or None where NNCF does
    not compress it (another consumer, another port, a weight of one dimension)."""
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


def _values(weight: Weight, read: Callable[[], torch.Tensor]) -> dict[str, np.ndarray]:
    """The arrays written for ``weight``, by part, from its float32 value."""
    value = read().detach().to(torch.float32).contiguous().numpy()
    if weight.format == "f16":
        return {"value": value.astype(np.float16)}
    if weight.format == "int8":
        from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig
        from nncf.quantization.algorithms.weight_compression.weight_lowering import compress_weight
        from nncf.parameters import CompressWeightsMode
        from nncf.tensor import Tensor

        packed = compress_weight(Tensor(value), weight.axes, WeightCompressionConfig(mode=CompressWeightsMode.INT8_ASYM))
        return {"tensor": np.asarray(packed.tensor.data, dtype=np.uint8),
                "zero_point": np.asarray(packed.zero_point.data, dtype=np.uint8),
                "scale": np.asarray(packed.scale.data, dtype=np.float32).astype(np.float16)}
    return {"value": value}


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
            for part, array in _values(weight, read[weight.name]).items():
                layer = layers[weight.tensors[part]]
                data = layer.find("data")
                if tuple(int(d) for d in data.get("shape").split(",") if d) != array.shape:
                    raise RuntimeError(f"{weight.name}: stored shape {array.shape} is not the traced "
                                       f"{data.get('shape')}")
                out.write(b"\0" * (-out.tell() % _ALIGN))
                offset = out.tell()
                out.write(memoryview(np.ascontiguousarray(array)).cast("B"))
                layer.set("type", "Const")
                data.attrib = {"element_type": data.get("element_type"), "shape": data.get("shape"),
                               "offset": str(offset), "size": str(array.nbytes)}
                del layer.find("output/port").attrib["names"]
    if left := sorted(name for name, layer in layers.items() if layer.get("type") == "Parameter"):
        raise RuntimeError(f"weight inputs left without values: {', '.join(left)}")
    tree.write(xml, encoding="utf-8", xml_declaration=True)

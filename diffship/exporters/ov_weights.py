"""OpenVINO weight formats: fp16, NNCF's 8-bit and group-wise 4-bit weights, hybrid 8-bit activations,
full 8-bit quantization of the denoiser.

Every format leaves the *precise* nodes alone: the subgraphs that compute sines and cosines (the
timestep embedding's frequencies, Flux's rotary position embedding from its token ids). There an angle
of hundreds of radians times a frequency rounded to fp16 (or to 8 or 4 bits, when NNCF takes the
frequency vector of ``outer(positions, frequencies)`` for a matrix-product weight) turns into a wrong
phase. Measured on tiny-flux (fp16 weights): the transformer at max abs 8.4e-2, cosine 0.99986 with
every constant in fp16 (fp16 parity needs 1e-2, 0.9999); 1.5e-3 with the frequencies kept fp32.
"""

from __future__ import annotations

import logging

from diffship.backends.openvino import OPENVINO
from diffship.errors import ExportError, MissingBackendError
from diffship.exporters.base import quiet_export
from diffship.exporters.ov_stream import streamed_weight

#: ops whose inputs are phases: everything they are computed from stays as the source computes it.
_PHASE_OPS = ("Sin", "Cos")
#: 4-bit weights in groups of this many input channels (NNCF's and optimum-intel's default); a layer
#: whose width it does not divide gets the largest power of two dividing it, down to 32 (NNCF's ADJUST), else 8 bits.
INT4_GROUP = 128
#: the smallest group ADJUST takes (NNCF's ``min_adjusted_group_size``)
MIN_INT4_GROUP = 32
_WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")


def precise_nodes(model) -> set[str]:
    """Friendly names of the nodes the sines and cosines of ``model`` are computed from (not its inputs)."""
    from diffship.exporters.quantization import upstream

    def sources(node) -> list:
        return [src for src in (i.get_source_output().get_node() for i in node.inputs())
                if src.get_type_name() != "Parameter"]

    return upstream([op for op in model.get_ops() if op.get_type_name() in _PHASE_OPS],
                    lambda node: node.get_friendly_name(), sources)


def keep_f32(model, groups: tuple[str, ...]) -> str:
    """Mark the convolutions and matrix products of the layer ``groups`` (and the softmax of
    ``attention-scores``) to compute in f32 where the runtime computes in bf16 or f16; returns what was marked.

    OpenVINO's CPU plugin leaves nodes whose precision conversion is disabled at their own precision when it
    lowers the rest to ``INFERENCE_PRECISION_HINT``. The legacy ``precise_0`` mark (what
    ``disable_fp16_compression`` sets) becomes that attribute when the IR is saved; compiled from memory
    without saving, it is ignored (OpenVINO 2026.4). Saved exports are what runs, so the mark is what holds.
    """
    from diffship.exporters.quantization import group_of

    marked = {n.name for n in quant_nodes(model) if group_of(n) in groups}
    for op in model.get_ops():
        if op.get_friendly_name() in marked:
            op.get_rt_info()["precise_0"] = ""
    return f"{len(marked)} node{'' if len(marked) == 1 else 's'} of {', '.join(groups)} compute f32 under bf16 inference"


def compress_fp16(model, precise: set[str]) -> None:
    """Store the float32 constants with more than one element as fp16 (decompressed to f32 on load, as
    ``save_model(compress_to_fp16=True)`` stores them), except the ``precise`` ones; scalars stay exact."""
    import numpy as np
    import openvino.opset13 as ops

    for op in model.get_ops():
        if (op.get_type_name() != "Constant" or op.get_friendly_name() in precise
                or op.get_output_element_type(0).get_type_name() != "f32"):
            continue
        data = op.get_data()
        if data.size < 2:
            continue
        half = ops.convert(ops.constant(data.astype(np.float16)), "f32")
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(half.output(0))


def _nncf():
    try:
        import nncf
    except ImportError:
        raise MissingBackendError("openvino int8", "nncf", OPENVINO.extra) from None
    if not logging.getLogger("diffship").isEnabledFor(logging.DEBUG):
        logging.getLogger("nncf").setLevel(logging.WARNING)  # NNCF logs every quantizer it skips at INFO
    return nncf


def _scope(nncf, names: set[str]):
    return nncf.IgnoredScope(names=sorted(names), validate=False) if names else None


def compress_int8(model, precise: set[str]):
    """8-bit weight compression (NNCF); activations stay float."""
    nncf = _nncf()
    with quiet_export():  # NNCF prints a table of what it compressed
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=_scope(nncf, precise))


def compress_int4(model, precise: set[str]):
    """Group-wise asymmetric 4-bit weights on every matrix product NNCF takes (ratio 1.0); returns the
    model and how many weights went to 4 and to 8 bits (NNCF keeps convolutions, embeddings and the last
    layer at 8)."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    with quiet_export():
        model = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=INT4_GROUP, ratio=1.0,
            ignored_scope=_scope(nncf, precise),
            advanced_parameters=AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST))
    counts = {"4-bit": 0, "8-bit": 0}
    for op in model.get_ops():  # the weights, not their zero points (of the same type)
        if op.get_type_name() == "Constant" and not op.get_friendly_name().endswith("/zero_point"):
            kind = op.get_output_element_type(0).get_type_name()
            if kind in ("u4", "i4"):
                counts["4-bit"] += 1
            elif kind in ("u8", "i8") and op.get_output_partial_shape(0).rank.get_length() >= 2:
                counts["8-bit"] += 1
    if not counts["4-bit"]:
        raise ExportError("int4 weight compression left no 4-bit weights (NNCF found no matrix product it "
                          "takes); export with --precision int8")
    return model, f"{counts['4-bit']} weights 4-bit (groups of up to {INT4_GROUP}), {counts['8-bit']} 8-bit"


def hybrid_int8(model, calibration: list[dict], precise: set[str]):
    """8-bit weights on the ops that have weights, then 8-bit activations on the remaining ops
    (attention products, additions...), with ranges from the recorded eager inputs."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    weighted = {op.get_friendly_name() for op in model.get_ordered_ops()
                if op.get_type_name() in _WEIGHTED and any(is_weight(i.get_source_output()) for i in op.inputs())}
    model = compress_int8(model, precise)
    samples = [{k: v.numpy() for k, v in call.items()} for call in calibration]
    with quiet_export():
        return nncf.quantize(
            model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
            ignored_scope=_scope(nncf, weighted | precise),
            advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alpha=-1),
        )


def is_weight(output) -> bool:
    """Whether a node output is a weight: a constant, its decompression, or a streamed export's weight input."""
    kind = output.get_node().get_type_name()
    return kind in ("Constant", "Convert") or (kind == "Parameter" and streamed_weight(output))


def quant_nodes(model) -> list:
    """The model's quantizable nodes as :class:`~diffship.exporters.quantization.QuantNode` records; the
    module path comes from the TorchScript frontend's names (``__module.unet.conv_in/aten::...``)."""
    from diffship.exporters.quantization import QuantNode

    kinds = {"Convolution": "conv", "GroupConvolution": "conv", "MatMul": "matmul", "Softmax": "softmax",
             "ScaledDotProductAttention": "scores"}
    nodes = []
    for op in model.get_ordered_ops():
        kind = kinds.get(op.get_type_name())
        if kind is None:
            continue
        if kind == "matmul" and not any(is_weight(i.get_source_output()) for i in op.inputs()):
            kind = "scores"
        name = op.get_friendly_name()
        path = name.split("/", 1)[0].removeprefix("__module.").split(".")[1:]
        nodes.append(QuantNode(name, kind, tuple(path)))
    return nodes


def full_int8(model, calibration: list[dict], precise: set[str], keep: tuple[str, ...] | None, progress=None,
              floor=None):
    """8-bit weights and activations on the convolutions and matrix products (NNCF's transformer preset,
    with SmoothQuant on matrix products), calibrated on recorded calls, with the layer groups that cost the
    most PSNR left float (:func:`~diffship.exporters.quantization.choose`), and with a ``floor``
    (:class:`~diffship.backends.quantized.Floor`) only where it passes; returns (model, choice), the model as
    given where the choice did not pass."""
    import openvino as ov

    from diffship.exporters import quantization

    nncf = _nncf()
    samples = [{k: v.numpy() for k, v in call.items()} for call in calibration]
    calibrate, scored = quantization.split_calls(samples)
    core = ov.Core()
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}  # measure the quantization, not the CPU's bf16 mode

    def run(candidate) -> list:
        compiled = core.compile_model(candidate, "CPU", f32)
        return [out for call in scored for out in compiled(call).values()]

    def quantize(float_nodes: set[str], data: list[dict]):
        with quiet_export():
            return nncf.quantize(model.clone(), nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER,
                                 preset=nncf.QuantizationPreset.MIXED, subset_size=len(data),
                                 ignored_scope=_scope(nncf, float_nodes | precise))

    expected = run(model) if keep is None else []
    value_range = floor.value_range if floor else None
    choice, float_nodes = quantization.choose(
        quant_nodes(model), keep, lambda names: quantization.psnr(expected, run(quantize(names, calibrate)), value_range),
        progress, floor.db if floor else None)
    return (quantize(float_nodes, samples) if choice.passed else model), choice

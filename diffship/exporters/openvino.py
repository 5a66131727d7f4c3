"""OpenVINO exporter: ``openvino.convert_model`` of each wrapper module, saved as IR.

Layout per component, as optimum-intel writes it: ``<component>/openvino_model.xml`` + ``.bin``
(see :mod:`diffship.backends.openvino`).
Precisions are weight formats, computation stays float32 on the host side of the graph:
``fp32``; ``fp16`` (weights compressed to fp16); ``int8`` (NNCF 8-bit weight compression); and
``hybrid-int8``: the denoiser (UNet) gets 8-bit weights *and* 8-bit activations on the operations
without weights, calibrated on inputs recorded from eager runs of the pipeline; the other components
get 8-bit weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from diffship.backends.manifest import ComponentEntry
from diffship.backends.openvino import MODEL_FILE, OPENVINO, OpenVINODetails
from diffship.errors import ExportError, MissingBackendError, first_line
from diffship.exporters.base import ExportOptions, component_files, io_description, quiet_export
from diffship.reference.specs import ComponentSpec


def export(spec: ComponentSpec, module: nn.Module, out_dir: Path, options: ExportOptions) -> ComponentEntry:
    """Convert ``module`` to OpenVINO IR in ``out_dir``.

    The graph's inputs and outputs stay float32 whatever the weight format (OpenVINO converts weights
    on load), so runners always feed float32. Symbolic dims become dynamic (-1) dims; the runtime
    reshapes to static shapes per request.
    """
    OPENVINO.require()
    import openvino as ov

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = module.float()  # fp16 is a weight format here: trace in fp32, compress on save
    inputs, outputs = io_description(spec, options)
    inputs, outputs = (tuple(replace(d, dtype="float32") if d.dtype == "float16" else d for d in io)
                       for io in (inputs, outputs))
    example = spec.example_inputs(options.profile, "fp32")
    shapes = [(ov.PartialShape([-1 if isinstance(d, str) else d for d in desc.dims]),
               ov.Type.i64 if desc.dtype == "int64" else ov.Type.f32) for desc in inputs]
    try:
        with quiet_export(), torch.no_grad():
            model = ov.convert_model(module, example_input=tuple(example.values()), input=shapes)
    except Exception as exc:
        raise ExportError(f"converting {spec.name} to OpenVINO failed ({type(exc).__name__}): "
                          f"{first_line(exc)}; "
                          f"re-run with --debug") from exc
    for port, name in zip(model.inputs, spec.input_names):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, spec.output_names):
        port.get_tensor().set_names({name})
    details = OpenVINODetails(weights="int8" if options.precision == "hybrid-int8" else options.precision)
    if options.precision == "hybrid-int8" and options.calibration:
        model = _hybrid_int8(model, options.calibration)
        details.activations = f"int8, calibrated on {len(options.calibration)} recorded calls"
    elif options.precision in ("int8", "hybrid-int8"):
        model = _compress_int8(model)
    ov.save_model(model, out_dir / MODEL_FILE, compress_to_fp16=options.precision == "fp16")
    return ComponentEntry(component=spec.name, source=spec.source, files=component_files(out_dir),
                          precision=options.precision, inputs=inputs, outputs=outputs, details=details)


def _nncf():
    try:
        import nncf
    except ImportError:
        raise MissingBackendError("openvino int8", "nncf", OPENVINO.extra) from None
    return nncf


def _compress_int8(model, ignored: list[str] | None = None):
    """8-bit weight compression (NNCF); activations stay float."""
    nncf = _nncf()
    scope = nncf.IgnoredScope(names=ignored) if ignored else None
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=scope)


_WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")


def _hybrid_int8(model, calibration: list[dict]):
    """8-bit weights on the ops that have weights, then 8-bit activations on the remaining ops
    (attention products, additions...), with ranges from the recorded eager inputs."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    weighted = [op.get_friendly_name() for op in model.get_ordered_ops()
                if op.get_type_name() in _WEIGHTED and any(
                    src.get_node().get_type_name() in ("Constant", "Convert")
                    for src in (i.get_source_output() for i in op.inputs()))]
    model = _compress_int8(model)
    samples = [{k: v.numpy() for k, v in call.items()} for call in calibration]
    with quiet_export():
        return nncf.quantize(
            model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples),
            ignored_scope=nncf.IgnoredScope(names=weighted, validate=False),
            advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alpha=-1),
        )

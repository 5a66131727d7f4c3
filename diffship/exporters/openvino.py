"""OpenVINO exporter: ``openvino.convert_model`` of each wrapper module, saved as IR.

Layout per component, as optimum-intel writes it: ``<component>/openvino_model.xml`` + ``.bin``
(see :mod:`diffship.backends.openvino`).
Precisions are weight formats, computation stays float32 on the host side of the graph:
``fp32``; ``fp16`` (weights compressed to fp16); ``int8`` (NNCF 8-bit weight compression); and
``hybrid-int8``: the denoiser (UNet) gets 8-bit weights *and* 8-bit activations on the operations
without weights, calibrated on inputs recorded from eager runs of the pipeline; the other components
get 8-bit weights. ``full-int8``: the denoiser's convolutions and matrix products get 8-bit weights and
activations (their integer kernels run), the layer groups that cost the most PSNR left float (measured;
:mod:`diffship.exporters.quantization`), and the VAE decoder's likewise where its outputs pass; the other
components 8-bit weights. ``int4``: the denoiser and T5 get group-wise 4-bit weights on their matrix products (NNCF; convolutions, embeddings and the last layer stay 8-bit, as NNCF keeps them); CLIP and the VAE get
8-bit weights (measured on tiny: 4-bit CLIP falls to cosine 0.977, below the int8 bar).

A streamed export (``options.weights``: every weight format but the calibrated ones) writes the IR's
weights one at a time (:mod:`diffship.exporters.ov_stream`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from diffship.backends.manifest import ComponentEntry
from diffship.backends.openvino import MODEL_FILE, OPENVINO, OpenVINODetails, OpenVINOExportOptions
from diffship.backends.quantized import FULL_INT8, floor_for, kept_groups, quantizes
from diffship.errors import ExportError, first_line
from diffship.exporters import ov_stream, ov_weights as weights
from diffship.exporters.base import ExportOptions, component_files, io_description, quiet_export, writing
from diffship.exporters.quantization import recorded
from diffship.reference.shapes import ShapeProfile
from diffship.reference.specs import ComponentSpec

log = logging.getLogger(__name__)
#: the precisions a streamed export writes weight by weight (hybrid-int8 and full-int8 calibrate on the loaded pipeline)
STREAMED = ("fp32", "fp16", "int8", "int4")


def export(spec: ComponentSpec, module: nn.Module, out_dir: Path, options: ExportOptions) -> ComponentEntry:
    """Convert ``module`` to OpenVINO IR in ``out_dir``.

    The graph's inputs and outputs stay float32 whatever the weight format (OpenVINO converts weights
    on load), so runners always feed float32. Symbolic dims become dynamic (-1) dims; the runtime
    reshapes to static shapes per request.
    """
    OPENVINO.require()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, outputs = io_description(spec, options)
    inputs, outputs = (tuple(replace(d, dtype="float32") if d.dtype == "float16" else d for d in io)
                       for io in (inputs, outputs))
    if options.weights is not None:
        if options.precision not in STREAMED:  # the workflow streams no calibrated precision
            raise ExportError(f"{spec.name}: a streamed OpenVINO export writes {', '.join(STREAMED)} weights, "
                              f"not {options.precision}; export with --no-stream")
        fed, placeholders, names = ov_stream.traceable(module, len(inputs))
        model = _converted(spec, fed, options, inputs, placeholders)
        ov_stream.plain_names(model)
        streamed = ov_stream.weight_inputs(model, names, len(inputs))
        return _finish(spec, model, out_dir, options, inputs, outputs, streamed)
    module = module.float()  # fp16 is a weight format here: trace in fp32, compress on save
    return _finish(spec, _converted(spec, module, options, inputs), out_dir, options, inputs, outputs)


def _converted(spec: ComponentSpec, module: nn.Module, options: ExportOptions, inputs, weights=()):
    """The OpenVINO model of ``module`` (fp32), traced with TorchScript at :func:`trace_profile`'s size;
    ``weights``: placeholders of the weights a streamed module takes after its inputs."""
    import openvino as ov

    example = tuple(spec.example_inputs(trace_profile(spec, options), "fp32").values()) + tuple(weights)
    shapes = [(ov.PartialShape([-1 if isinstance(d, str) else d for d in desc.dims]),
               ov.Type.i64 if desc.dtype == "int64" else ov.Type.f32) for desc in inputs]
    shapes += [(ov.PartialShape(list(w.shape)), ov.Type.f32 if w.is_floating_point() else ov.Type.i64) for w in weights]
    try:
        with quiet_export(), torch.no_grad():
            from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

            # torch.jit.trace's check re-runs the module and the traced graph (parity checks the export);
            # tracing runs it once, at trace_profile's size.
            decoder = TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})
            return ov.convert_model(decoder, example_input=example, input=shapes)
    except Exception as exc:
        raise ExportError(f"converting {spec.name} to OpenVINO failed ({type(exc).__name__}): "
                          f"{first_line(exc)}; "
                          f"re-run with --debug") from exc


def _finish(spec: ComponentSpec, model, out_dir: Path, options: ExportOptions, inputs, outputs,
            streamed: list[ov_stream.Weight] | None = None) -> ComponentEntry:
    """Name the model's IO as the spec does, apply the weight format, save the IR; ``streamed``: the
    model's weights are inputs, written from ``options.weights`` once it is saved."""
    import openvino as ov

    for port, name in zip(model.inputs, spec.input_names):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, spec.output_names):
        port.get_tensor().set_names({name})
    precision = options.precision
    if precision == "int4" and not takes_int4(spec):
        precision = "int8"  # CLIP, the VAE: see takes_int4
    details = OpenVINODetails(weights="int8" if precision in ("hybrid-int8", FULL_INT8) else precision)
    precise = weights.precise_nodes(model)
    quantized = _full_int8(spec, model, options, precise, details) if precision == FULL_INT8 else None
    if streamed is not None:
        details.int4 = ov_stream.apply_format(model, streamed, precision, precise)
    elif quantized is not None:
        model = quantized
    elif precision == "hybrid-int8" and options.calibration:
        model = weights.hybrid_int8(model, options.calibration, precise)
        details.activations = f"int8, calibrated on {len(options.calibration)} recorded calls"
    elif precision in ("int8", "hybrid-int8", FULL_INT8):
        model = weights.compress_int8(model, precise)
    elif precision == "int4":
        model, details.int4 = weights.compress_int4(model, precise)
    elif precision == "fp16":
        weights.compress_fp16(model, precise)
    f32 = kept_groups((options.backend or OpenVINOExportOptions()).f32_groups)
    if f32:
        details.f32_nodes = weights.keep_f32(model, f32)
    with writing(spec, out_dir):
        ov.save_model(model, out_dir / MODEL_FILE, compress_to_fp16=False)  # fp16: compressed above, all but `precise`
        if streamed is not None:
            ov_stream.write_weights(out_dir / MODEL_FILE, streamed, options.weights)
    return ComponentEntry(component=spec.name, source=spec.source, files=component_files(out_dir),
                          precision=precision, inputs=inputs, outputs=outputs, details=details)


def _full_int8(spec: ComponentSpec, model, options: ExportOptions, precise: set[str], details: OpenVINODetails):
    """``model`` with 8-bit activations as ``full-int8`` gives them to ``spec``'s component (recording what
    was measured in ``details``), or None where it takes none (8-bit weights only)."""
    keep = kept_groups((options.backend or OpenVINOExportOptions()).keep_float)
    if not options.calibration or not quantizes(spec, keep):
        return None
    model, choice = weights.full_int8(model, options.calibration, precise, keep, log.info, floor_for(spec, keep))
    if not recorded(choice, details, spec.name):
        return None
    details.activations = f"int8 on convolutions and matrix products, calibrated on {len(options.calibration)} recorded calls"
    return model


#: the image side (pixels) dynamic-shape exports are traced at, or twice the size multiple where that is
#: larger: TorchScript tracing runs the module, and at the export profile's size that took minutes per call
#: (SD3's transformer at 1024x1024, SD 1.5's VAE decoder at 512x512); the graph's image dims are dynamic.
TRACE_SIDE = 128


def trace_profile(spec: ComponentSpec, options: ExportOptions) -> ShapeProfile:
    """The request shape ``spec`` is traced at: the export's own for static exports, else images of
    :data:`TRACE_SIDE` pixels a side (never larger than the export's), in multiples the model takes."""
    profile = options.profile
    if options.static:
        return profile
    multiple = options.size_multiple
    side = -(-max(TRACE_SIDE, 2 * multiple) // multiple) * multiple
    return replace(profile, height=min(side, profile.height), width=min(side, profile.width))


def takes_int4(spec: ComponentSpec) -> bool:
    """Whether ``int4`` gives this component 4-bit weights: the denoiser and T5 (``low_bit_weights``)."""
    return spec.denoiser or spec.low_bit_weights

"""ONNX exporter: ``torch.onnx.export(dynamo=True)`` of each wrapper module, checked and shape-inferred.

Layout per component (as optimum writes it): ``<component>/model.onnx`` and, past the 2 GB protobuf
limit or when asked, the weights in ``<component>/model.onnx.data`` (see :mod:`diffship.backends.onnx`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from diffship._isolate import run_isolated
from diffship.backends.manifest import ComponentEntry, TensorIO
from diffship.backends.onnx import MODEL_FILE, ONNX, OnnxDetails, OnnxExportOptions
from diffship.errors import ExportError, first_line
from diffship.exporters.base import ExportOptions, component_files, io_description, quiet_export
from diffship.reference.specs import ComponentSpec

#: graphs whose weights exceed this are saved with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2


def weight_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers, i.e. the size of the exported initializers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def needs_external_data(module: nn.Module, requested: bool | None) -> bool:
    """Whether to write weights as external data: as requested, else when the graph would pass 2 GB."""
    return requested if requested is not None else weight_bytes(module) > EXTERNAL_DATA_BYTES


def _dynamic_shapes(spec: ComponentSpec, static: bool) -> dict[str, dict[int, object]] | None:
    symbolic = spec.symbolic_dims(static)
    if not symbolic:
        return None
    dyn = torch.export.Dim.DYNAMIC
    return {t.name: {i: dyn for i, d in enumerate(t.dims) if d in symbolic} for t in spec.inputs}


def export(spec: ComponentSpec, module: nn.Module, out_dir: Path, options: ExportOptions) -> ComponentEntry:
    """Export ``module`` (the spec's wrapper, already in the target precision) to ``out_dir/model.onnx``.

    Symbolic dims get the spec's names (``batch``, ``latent_height``...) in the graph, so runtimes and
    later tools (TensorRT profiles) can read them back. ``options.backend`` is an
    :class:`~diffship.backends.onnx.OnnxExportOptions` (defaults when None).
    """
    ONNX.require()
    onnx_options: OnnxExportOptions = options.backend or OnnxExportOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = options.profile
    if "batch" in spec.symbolic_dims(options.static) and spec.dims(profile)["batch"] == 1:
        # A dim traced at size 1 may be specialised (Flux's transformer then reshapes every batch to 1 row).
        profile = replace(profile, batch_size=2)
    example = spec.example_inputs(profile, options.precision)
    inputs, outputs = io_description(spec, options)
    try:
        with quiet_export(), torch.no_grad():
            program = torch.onnx.export(
                module, tuple(example.values()), input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=_dynamic_shapes(spec, options.static), opset_version=onnx_options.opset,
                dynamo=True, optimize=True,
            )
    except Exception as exc:
        raise ExportError(f"exporting {spec.name} to ONNX failed ({type(exc).__name__}): {first_line(exc)}; "
                          f"re-run with --debug for the exporter's report") from exc
    if spec.symbolic_dims(options.static):
        _name_dims(program, spec, inputs, outputs)
    external = needs_external_data(module, onnx_options.external_data)
    path = out_dir / MODEL_FILE
    program.save(str(path), external_data=external)
    import onnx.checker
    import onnx.shape_inference

    # onnx.checker with full shape inference is native code: run it in a child interpreter, which
    # imports only onnx (the function is passed by its own module name).
    try:
        run_isolated(f"checking {spec.name}/{MODEL_FILE}", onnx.checker.check_model, str(path), full_check=True,
                     error=ExportError)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported {spec.name} graph is invalid ({first_line(exc)}); "
                          f"re-run with --debug and report it") from exc
    return ComponentEntry(component=spec.name, source=spec.source, files=component_files(out_dir),
                          precision=options.precision, inputs=inputs, outputs=outputs,
                          details=OnnxDetails(opset=onnx_options.opset, external_data=external))


def _name_dims(program, spec: ComponentSpec, inputs: tuple[TensorIO, ...], outputs: tuple[TensorIO, ...]) -> None:
    """Give the exported graph's symbolic dims the spec's names, inputs and outputs alike."""
    import onnx_ir as ir

    graph = program.model.graph
    mapping = {}
    for value, desc in zip(graph.inputs, inputs):
        for dim, name in zip(value.shape, desc.dims):
            if isinstance(name, str) and isinstance(dim, ir.SymbolicDim) and dim.value not in mapping:
                mapping[dim.value] = name
    program.rename_axes(mapping)
    # Output dims come out as expressions of the inputs' ("2*((h-1)//2)+2"); the spec states them plainly.
    for value, desc in zip(graph.outputs, outputs):
        value.shape = ir.Shape(desc.dims)

"""ONNX exporter: ``torch.onnx.export(dynamo=True)`` of each wrapper module, checked and shape-inferred.

Layout per component (as optimum writes it): ``<component>/model.onnx`` and, past the 2 GB protobuf
limit or when asked, the weights in ``<component>/model.onnx.data`` (see :mod:`diffship.backends.onnx`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from diffship._isolate import run_isolated
from diffship.backends.manifest import ComponentEntry, TensorIO
from diffship.backends.onnx import MODEL_FILE, ONNX, OnnxDetails, OnnxExportOptions
from diffship.backends.quantized import FULL_INT8, floor_for, kept_groups, quantizes
from diffship.errors import ExportError, first_line
from diffship.exporters import onnx_quantize
from diffship.exporters.base import ExportOptions, component_files, io_description, quiet_export, writing
from diffship.exporters.quantization import recorded
from diffship.reference.specs import ComponentSpec
from diffship.reference.weights import converted, fake_mode, weight_bytes

log = logging.getLogger(__name__)

#: graphs whose weights exceed this are saved with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2


def needs_external_data(module: nn.Module, requested: bool | None) -> bool:
    """Whether to write weights as external data: as requested, else when the graph would pass 2 GB."""
    return requested if requested is not None else weight_bytes(module) > EXTERNAL_DATA_BYTES


def _dynamic_shapes(spec: ComponentSpec, static: bool) -> dict[str, dict[int, object]] | None:
    symbolic = spec.symbolic_dims(static)
    if not symbolic:
        return None
    dyn = torch.export.Dim.DYNAMIC
    return {t.name: {i: dyn for i, d in enumerate(t.dims) if d in symbolic} for t in spec.inputs}


def _exact_floor_division() -> dict:
    """Python's ``//`` on symbolic sizes as a true floor division.

    torch.onnx's default translation of ``operator.floordiv`` is ONNX ``Div``, which truncates: right for
    the positive operands it assumes, wrong for the negative ones torch.export's shape algebra produces
    (SD3's positional-embedding crop ends at ``16 + n + (-n) // 2``: one patch too long at odd patch
    counts, and the graph fails at those sizes). torch_lib's ``aten::floor_divide`` floors signed integers.
    """
    import operator

    from onnxscript.function_libs.torch_lib.ops.core import aten_floor_divide

    return {operator.floordiv: aten_floor_divide}


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
    example = tuple(spec.example_inputs(profile, options.precision).values())
    if options.weights is not None:
        mode = fake_mode(module)  # a streamed module: its inputs must be fake tensors of the same mode
        example = tuple(mode.from_tensor(t) for t in example)
    inputs, outputs = io_description(spec, options)
    try:
        with quiet_export(), torch.no_grad():
            program = torch.onnx.export(
                module, example, input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=_dynamic_shapes(spec, options.static), opset_version=onnx_options.opset,
                dynamo=True, optimize=False, custom_translation_table=_exact_floor_division(),
            )
            if options.weights is not None:
                _attach_weights(program.model.graph, options.weights, spec.name)
            # as export(optimize=True) would: constant folding only reads tensors of up to 8192 values, so a
            # streamed export folds exactly what a normal one does and never reads a large weight here
            program.optimize()
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"exporting {spec.name} to ONNX failed ({type(exc).__name__}): {first_line(exc)}; "
                          f"re-run with --debug for the exporter's report") from exc
    if spec.symbolic_dims(options.static):
        _name_dims(program, spec, inputs, outputs)
    external = needs_external_data(module, onnx_options.external_data)
    path = out_dir / MODEL_FILE
    with writing(spec, out_dir):
        program.save(str(path), external_data=external)
    details = OnnxDetails(opset=onnx_options.opset, external_data=external, checked=onnx_options.check)
    precision = options.precision
    keep = kept_groups(onnx_options.keep_float)
    if precision == FULL_INT8 and options.calibration and quantizes(spec, keep):
        choice = onnx_quantize.quantize(path, options.calibration, keep, external, log.info, floor_for(spec, keep))
        if not recorded(choice, details, spec.name):
            precision = "fp32"  # under its floor: the graph was left as exported
    elif precision == FULL_INT8:
        precision = "fp32"  # full-int8 quantizes the denoiser and the VAE decoder; the others stay exact
    if onnx_options.check:
        _check(spec, path)
    return ComponentEntry(component=spec.name, source=spec.source, files=component_files(out_dir),
                          precision=precision, inputs=inputs, outputs=outputs, details=details)


def _check(spec: ComponentSpec, path: Path) -> None:
    """``onnx.checker`` with full shape inference on the saved graph; :class:`ExportError` if invalid."""
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


def _attach_weights(graph, weights, name: str) -> None:
    """Give each placeholder initializer its weight as a lazy tensor: read from its source (and converted)
    only when the file is written, one at a time, then released.

    A weight the graph transposes (linear layers on 3-D inputs) becomes its transposed copy, lazily too:
    the optimizer folds every such Transpose whatever its size, which on a streamed weight would read
    and keep it in memory (all of them: the model's size in memory, for Flux's transformer).
    """
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor, to_torch_dtype

    sources = {}  # initializer -> (its value, its weight, the permutation it is stored in)
    for key, value in graph.initializers.items():
        if key in weights:
            sources[key] = (value, weights[key], None)
        elif isinstance(getattr(value.const_value, "raw", None), FakeTensor):
            raise ExportError(f"{name}: the streamed export found no weight for {key}; export with --no-stream")
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" and node.inputs else None
        if source is None or source.name not in sources or len(source.consumers()) != 1:
            continue
        out, key = node.outputs[0], node.outputs[0].name
        perm = node.attributes["perm"].value if "perm" in node.attributes else list(range(len(source.shape)))[::-1]
        folded = ir.Value(type=ir.TensorType(source.dtype), shape=ir.Shape([source.shape[i] for i in perm]))
        ir.convenience.replace_all_uses_with(out, folded)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        folded.name = key  # the name the optimizer gives a folded Transpose: its output's
        sources[key] = (folded, sources.pop(source.name)[1], tuple(perm))
    for key, (value, ref, perm) in sources.items():
        # in the graph's dtype (an exporter may have converted the placeholders: OpenVINO traces in fp32)
        def tensor(ref=ref, perm=perm, dtype=to_torch_dtype(value.dtype), key=key):
            t = converted(ref(), dtype)
            return TorchTensor(t.permute(perm).contiguous() if perm else t, key)

        value.const_value = ir.LazyTensor(tensor, dtype=value.dtype, shape=value.shape, name=key)
        if key not in graph.initializers:
            graph.register_initializer(value)


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

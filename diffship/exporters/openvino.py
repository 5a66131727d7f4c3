"""OpenVINO exporter: ``openvino.convert_model`` of each wrapper module, saved as IR.

Layout per component, as optimum-intel writes it: ``<component>/openvino_model.xml`` + ``.bin``.
Precisions are weight formats, computation stays float32 on the host side of the graph:
``fp32``; ``fp16`` (weights compressed to fp16); ``int8`` (NNCF 8-bit weight compression).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffship._registry import require_modules
from diffship.errors import ExportError, MissingBackendError
from diffship.exporters.base import Artifact, ExportOptions, io_description, quiet_export
from diffship.reference.specs import ComponentSpec

BACKEND = "openvino"
EXTRA = "openvino"
PACKAGES = ("openvino",)
PRECISIONS = ("fp32", "fp16", "int8")
MODEL_FILE = "openvino_model.xml"


def versions() -> dict[str, str]:
    import openvino

    found = {"openvino": openvino.__version__}
    try:
        import nncf

        found["nncf"] = nncf.__version__
    except ImportError:
        pass
    return found


def export(spec: ComponentSpec, module: nn.Module, out_dir: Path, options: ExportOptions) -> Artifact:
    """Convert ``module`` to OpenVINO IR in ``out_dir``.

    The graph's inputs and outputs stay float32 whatever the weight format (OpenVINO converts weights
    on load), so runners always feed float32. Symbolic dims become dynamic (-1) dims; the runtime
    reshapes to static shapes per request.
    """
    require_modules(BACKEND, EXTRA, *PACKAGES)
    if options.extra:
        raise ExportError(f"unknown openvino export option(s) {', '.join(sorted(options.extra))}; it takes none "
                          f"(choose weights with --precision fp32|fp16|int8)")
    import openvino as ov

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = module.float()  # fp16 is a weight format here: trace in fp32, compress on save
    inputs, outputs = io_description(spec, options)
    for desc in (*inputs, *outputs):
        if desc["dtype"] == "float16":
            desc["dtype"] = "float32"
    example = spec.example_inputs(options.profile, "fp32")
    shapes = [(ov.PartialShape([-1 if isinstance(d, str) else d for d in desc["dims"]]),
               ov.Type.i64 if desc["dtype"] == "int64" else ov.Type.f32) for desc in inputs]
    try:
        with quiet_export(), torch.no_grad():
            model = ov.convert_model(module, example_input=tuple(example.values()), input=shapes)
    except Exception as exc:
        raise ExportError(f"converting {spec.name} to OpenVINO failed ({type(exc).__name__}): "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}; "
                          f"re-run with --debug") from exc
    for port, name in zip(model.inputs, spec.input_names):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, spec.output_names):
        port.get_tensor().set_names({name})
    if options.precision == "int8":
        model = _compress_int8(model)
    ov.save_model(model, out_dir / MODEL_FILE, compress_to_fp16=options.precision == "fp16")
    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    return Artifact(component=spec.name, files=files, precision=options.precision, inputs=inputs, outputs=outputs,
                    details={"weights": options.precision})


def _compress_int8(model):
    """8-bit weight compression (NNCF); activations stay float."""
    try:
        import nncf
    except ImportError:
        raise MissingBackendError("openvino int8", "nncf", EXTRA) from None
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)

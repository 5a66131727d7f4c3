"""What every exporter shares: options, the artifact it returns, and the backend-module protocol.

A backend is one module in ``diffship/exporters/`` defining::

    BACKEND: str                 # name used on the command line and in manifests ("onnx")
    EXTRA: str                   # pip extra that installs it
    PACKAGES: tuple[str, ...]    # top-level modules it needs (checked without importing them)
    PRECISIONS: tuple[str, ...]  # export precisions it takes ("fp32", "fp16", ...)
    CALIBRATED: tuple[str, ...]  # optional: precisions whose denoiser export needs calibration data
    COMPUTE: dict[str, str]      # optional: weight formats -> the precision they compute in ({"int8": "fp16"})
    FIXED_SHAPES: bool           # optional: exports take only the sizes they were made for (Core ML)
    def versions() -> dict       # library versions recorded in the manifest
    def export(spec, module, out_dir, options) -> Artifact

Nothing else in diffship names a backend: the registry in ``diffship.exporters`` discovers modules.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from diffship.reference.specs import ComponentSpec, ShapeProfile


@dataclass(frozen=True)
class ExportOptions:
    """Options for exporting one component.

    Attributes:
        precision: ``fp32`` or ``fp16`` -- the precision this component is exported in (the pipeline
            orchestrator has already applied fp32 fallbacks).
        profile: the shape traced with, and the only shape accepted when ``static``.
        static: fix every dim to ``profile``'s values instead of exporting symbolic dims.
        opset: ONNX opset for backends that go through ONNX.
        external_data: store weights next to the graph: ``True``, ``False``, or ``None`` to decide by
            size (graphs past the 2 GB protobuf limit must).
        calibration: for precisions a backend lists in ``CALIBRATED``, the inputs this component
            received in eager runs of the pipeline (spec-named tensors per call); None otherwise.
        size_multiple: image sizes (pixels) the whole pipeline takes are multiples of this (the VAE
            factor times the UNet's latent multiple); backends that fix shape ranges validate with it.
        metadata: facts about the export for backends that embed metadata in their files: source
            (name), source_fingerprint, diffship_version, pipeline_class.
        extra: backend-specific options, passed through untouched.
    """

    precision: str = "fp32"
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    static: bool = False
    opset: int = 18
    external_data: bool | None = None
    calibration: list[dict[str, Any]] | None = None
    size_multiple: int = 8
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Artifact:
    """What an exporter wrote for one component.

    Attributes:
        component: component name.
        files: files written, relative to the component folder.
        precision: precision actually exported.
        inputs: per input ``{"name", "dtype", "dims"}`` (dims: ints, or symbolic names when dynamic).
        outputs: same for outputs.
        details: backend facts worth recording (opset, external data, ...).
    """

    component: str
    files: list[str]
    precision: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Exporter(Protocol):
    BACKEND: str
    EXTRA: str
    PACKAGES: tuple[str, ...]
    PRECISIONS: tuple[str, ...]

    def versions(self) -> dict[str, str]: ...

    def export(self, spec: ComponentSpec, module: nn.Module, out_dir: Path, options: ExportOptions) -> Artifact: ...


def io_description(spec: ComponentSpec, options: ExportOptions) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of ``spec`` as exported with ``options``: dims stay named where symbolic."""
    dims = spec.dims(options.profile)
    symbolic = spec.symbolic_dims(options.static)

    def describe(t):
        d = t.to_dict(options.precision)
        d["dims"] = [x if isinstance(x, int) or x in symbolic else dims[x] for x in t.dims]
        return d

    return [describe(t) for t in spec.inputs], [describe(t) for t in spec.outputs]


def quiet_export() -> contextlib.ExitStack:
    """Silence converters' chatter (progress lines, tracer warnings) unless diffship logs at DEBUG."""
    stack = contextlib.ExitStack()
    if not logging.getLogger("diffship").isEnabledFor(logging.DEBUG):
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    return stack

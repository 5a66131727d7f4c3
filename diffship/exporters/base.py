"""What every exporter shares: the options of one component's export, its IO description, quiet converters.

An exporter is the module its backend record names (``Backend.exporter``), defining::

    def export(spec, module, out_dir, options: ExportOptions) -> ComponentEntry

``module`` is the spec's wrapper, already in the precision the export computes in; the exporter writes
its files into ``out_dir`` and returns the manifest entry (its details as the backend's record). The
facts an exporter shares with its runtime (file names, option records, IO conventions) live in its
backend record (:mod:`diffship.backends`); exporters never import runtimes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from diffship.backends.manifest import TensorIO
from diffship.reference.shapes import ShapeProfile
from diffship.reference.specs import ComponentSpec


@dataclass(frozen=True)
class ExportOptions:
    """Options for exporting one component.

    Attributes:
        precision: the precision this component is exported in (the export workflow has already applied
            fp32 fallbacks): ``fp32``, ``fp16``, ``bf16``, or a backend's weight format.
        profile: the shape traced with, and the only shape accepted when ``static``.
        static: fix every dim to ``profile``'s values instead of exporting symbolic dims.
        backend: the backend's own options, parsed and validated (its ``export_options`` record).
        calibration: for precisions a backend lists as calibrated, the inputs this component received in
            eager runs of the pipeline (spec-named tensors per call); None otherwise.
        size_multiple: image sizes (pixels) the whole pipeline takes are multiples of this (the VAE
            factor times the UNet's latent multiple); backends that fix shape ranges validate with it.
        metadata: facts about the export for backends that embed metadata in their files: source
            (name), source_fingerprint, diffship_version, pipeline_class.
        text_sequence: the pipeline's default T5 sequence length (its ``max_sequence_length``), or None for
            a pipeline without T5 (its text sequence is CLIP's, fixed); backends that build shape ranges
            take ranges of it around this.
        weights: for a streamed export, where each weight comes from: the module's parameters are then
            placeholders without storage (:func:`~diffship.reference.weights.streamed_copy`), and this maps
            each one's name in the module to a function returning its value (one tensor at a time); None
            when the module holds its weights. Only backends that declare ``streams`` receive it.
    """

    precision: str = "fp32"
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    static: bool = False
    backend: Any = None
    calibration: list[dict[str, Any]] | None = None
    size_multiple: int = 8
    metadata: dict[str, str] = field(default_factory=dict)
    text_sequence: int | None = None
    weights: Mapping[str, Callable[[], Any]] | None = None


def io_description(spec: ComponentSpec, options: ExportOptions) -> tuple[tuple[TensorIO, ...], tuple[TensorIO, ...]]:
    """Inputs and outputs of ``spec`` as exported with ``options``: dims stay named where symbolic."""
    dims = spec.dims(options.profile)
    symbolic = spec.symbolic_dims(options.static)

    def describe(t) -> TensorIO:
        return TensorIO(name=t.name, dtype=t.dtype_name(options.precision),
                        dims=[x if isinstance(x, int) or x in symbolic else dims[x] for x in t.dims])

    return tuple(describe(t) for t in spec.inputs), tuple(describe(t) for t in spec.outputs)


def component_files(out_dir: Path) -> list[str]:
    """Every file an exporter wrote into ``out_dir``, relative and sorted (the entry's ``files``)."""
    return sorted(p.relative_to(out_dir).as_posix() for p in Path(out_dir).rglob("*") if p.is_file())


@contextlib.contextmanager
def writing(spec: ComponentSpec, out_dir: Path):
    """Turn a converter's failure to write its files (a full disk: OpenVINO raises ``RuntimeError:
    basic_ios::clear``) into one :class:`~diffship.errors.ExportError` that says where."""
    from diffship.errors import ExportError, first_line

    try:
        yield
    except (ExportError, AssertionError):  # an AssertionError is a bug of ours (exit 3), not the disk
        raise
    except Exception as exc:
        raise ExportError(f"writing {spec.name} into {out_dir} failed ({type(exc).__name__}: {first_line(exc)}); "
                          f"check the free disk space there") from exc


def quiet_export() -> contextlib.ExitStack:
    """Silence converters' chatter (progress lines, tracer warnings) unless diffship logs at DEBUG."""
    stack = contextlib.ExitStack()
    if not logging.getLogger("diffship").isEnabledFor(logging.DEBUG):
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    return stack

"""The backend record: everything diffship knows about one backend, in one typed value.

An exporter (``diffship/exporters/<name>.py``) and a runtime (``diffship/runtimes/<module>.py``) serve
each backend; neither imports the other. What both need -- the backend's name, pip extra and packages,
precisions, file names, option and manifest-detail records, and facts such as Core ML's IO conventions
or TensorRT's flavours -- lives in ``diffship/backends/<name>.py``, which defines one :class:`Backend`
and is listed in the registry (:mod:`diffship.backends`).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping

from diffship.configs.fields import parse, to_data
from diffship.errors import ExportedModelError, MissingBackendError, OptionError


def require_modules(backend: str, extra: str, *names: str) -> None:
    """Raise :class:`MissingBackendError` naming the pip extra if a module is missing (without importing it).

    A name ``"a|b"`` is satisfied by either module (TensorRT ships as ``tensorrt`` or ``tensorrt_rtx``).
    """
    for n in names:
        if not any(importlib.util.find_spec(alt) is not None for alt in n.split("|")):
            raise MissingBackendError(backend, n.replace("|", "' or '"), extra)


def module_versions(*names: str) -> dict[str, str]:
    """``__version__`` of each installed module among ``names`` (``"a|b"``: whichever is installed)."""
    out = {}
    for alt in (a for n in names for a in n.split("|")):
        if importlib.util.find_spec(alt) is not None:
            out[alt] = str(getattr(importlib.import_module(alt), "__version__", "unknown"))
    return out


def describe_settings(settings: Mapping[str, Any]) -> str:
    """Runtime settings as ``key=value`` pairs for one line of a report (what ran)."""
    return " ".join(f"{k}={v}" for k, v in settings.items()) or "the runtime's defaults"


@dataclass(kw_only=True)
class Details:
    """Backend facts recorded per component in the manifest (``details``); each backend extends it.

    Attributes:
        fp32_fallback: why a component of a reduced-precision export was exported in fp32 (its VAE
            config asks for it, or the reduced-precision export produced non-finite values); None
            when it was exported as asked.
        kept_float: for ``full-int8``'s quantized components (the denoiser, the VAE decoder where it
            passes), the layer groups left float (measured or asked for).
        quantized_psnr: for those when measured, the PSNR (dB) of their outputs against the float graph's
            with every group quantized and with each group kept float.
        float_activations: for ``full-int8``'s VAE decoder, why its activations stayed float (its quantized
            outputs fell under the floor), or None.
    """

    fp32_fallback: str | None = None
    kept_float: list[str] | None = None
    quantized_psnr: dict[str, float] | None = None
    float_activations: str | None = None


@dataclass(frozen=True)
class NoOptions:
    """A backend side that takes no options."""


@dataclass(frozen=True)
class Backend:
    """One backend, as its exporter, its runtime and every tool see it.

    Attributes:
        name: the name on the command line and in manifests (``onnx``).
        extra: the pip extra that installs it (``pip install 'diffship[EXTRA]'``).
        packages: top-level modules the exporter needs (``"a|b"``: either), checked without importing.
        runtime_packages: top-level modules the runtime needs.
        optional_packages: modules recorded in manifests when installed (NNCF for OpenVINO int8).
        precisions: the export precisions it takes (``fp32``, ``fp16``, weight formats such as ``int8``).
        compute: weight formats -> the precision they compute in (Core ML palettes compute in fp16).
        calibrated: precisions whose denoiser export needs inputs recorded from eager runs.
        calibration_side: the largest image side (pixels) those runs take by default, where its calibrator
            holds every quantized op's inputs of a whole call in memory (ONNX Runtime's); None: no limit.
        fixed_shapes: exports take only the sizes they were made for (Core ML).
        streams: its exporter takes a module whose weights are placeholders and copies each weight from
            its source file as it writes (``ExportOptions.weights``), so an export never holds the model.
        model_file: the file each component folder holds (None where its name varies: TensorRT engines).
        export_options: the record of its ``-o KEY=VALUE`` export options.
        runtime_options: the record of its runtime options (``load_pipeline(..., **options)``).
        details: the record of what it writes into each manifest component's ``details``.
        exporter: module path of its exporter (``export(spec, module, out_dir, options)``).
        runner: ``module:Class`` of its runner (a :class:`~diffship.runtimes.base.Runner`).
        runtime_unavailable: returns why this machine cannot run its exports (no GPU), or None.
    """

    name: str
    extra: str
    packages: tuple[str, ...]
    runtime_packages: tuple[str, ...]
    precisions: tuple[str, ...]
    export_options: type
    runtime_options: type
    details: type
    exporter: str
    runner: str
    model_file: str | None = None
    optional_packages: tuple[str, ...] = ()
    compute: Mapping[str, str] = field(default_factory=dict)
    calibrated: tuple[str, ...] = ()
    calibration_side: int | None = None
    fixed_shapes: bool = False
    streams: bool = False
    runtime_unavailable: Callable[[], str | None] | None = None

    # --- packages and platform --------------------------------------------------------------------------

    def require(self, runtime: bool = False) -> None:
        """Raise :class:`MissingBackendError` (naming the pip extra) if its exporter's -- or with
        ``runtime``, its runtime's -- packages are missing."""
        require_modules(self.name, self.extra, *(self.runtime_packages if runtime else self.packages))

    def installed(self, runtime: bool = False) -> bool:
        try:
            self.require(runtime)
        except MissingBackendError:
            return False
        return True

    def unavailable_reason(self) -> str | None:
        """Why its exports cannot run here (a missing package, no GPU), or None when they can."""
        try:
            self.require(runtime=True)
        except MissingBackendError as exc:
            return str(exc)
        return self.runtime_unavailable() if self.runtime_unavailable else None

    def versions(self) -> dict[str, str]:
        """Versions of its installed libraries, as manifests and benchmark results record them."""
        return module_versions(*self.packages, *self.runtime_packages, *self.optional_packages)

    # --- code, loaded lazily ------------------------------------------------------------------------------

    def exporter_module(self) -> ModuleType:
        """Its exporter module, after checking its packages (heavy imports happen only now)."""
        self.require()
        return importlib.import_module(self.exporter)

    def runner_class(self) -> type:
        """Its runner class, after checking the runtime's packages."""
        self.require(runtime=True)
        module, _, name = self.runner.partition(":")
        return getattr(importlib.import_module(module), name)

    # --- records --------------------------------------------------------------------------------------------

    def compute_precision(self, precision: str) -> str:
        """The precision an export of ``precision`` computes in (weight formats compute in another)."""
        return self.compute.get(precision, precision)

    def parse_export_options(self, data: Mapping[str, Any]) -> Any:
        """Its export options from ``-o KEY=VALUE`` data, every key and value checked (:class:`OptionError`)."""
        return parse(self.export_options, data, f"{self.name} export option", error=OptionError)

    def parse_runtime_options(self, data: Mapping[str, Any]) -> Any:
        """Its runtime options, every key and value checked (:class:`OptionError`)."""
        return parse(self.runtime_options, data, f"{self.name} runtime option", error=OptionError)

    def runtime_settings(self, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Its runtime options as plain data, every default filled in (unset ones left out): what a manifest
        records and what tools report as the settings that ran."""
        return to_data(self.parse_runtime_options(data or {}), drop_none=True)

    def parse_details(self, data: Mapping[str, Any], where: str) -> Any:
        """A manifest component's ``details`` as its record; :class:`ExportedModelError` if malformed."""
        return parse(self.details, data, "details key", where=where, error=ExportedModelError)

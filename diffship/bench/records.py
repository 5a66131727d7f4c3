"""Benchmark results as typed records (schema ``diffship.bench/1``); JSON Schema in ``bench/schema.json``.

The coordinator builds these records while it measures; :mod:`~diffship.bench.output` writes them as
JSON (:meth:`BenchResults.to_data`), CSV and Markdown; :func:`read_results` reads a results file back,
validating every key. In short::

    schema: "diffship.bench/1"
    complete: false while running or after an interruption (what finished is kept)
    created: ISO time; command: the command line that produced it
    settings: the BenchSettings (sizes as "HxW")
    machine: cpu, architecture, logical/physical/usable cores, isa flags, memory_bytes, os, python,
             torch_threads, gpu, versions {library: version}
    source: {name, kind, path, pipeline_class, fingerprint} of what was benchmarked
    reference: the subject parity is measured against ("torch-fp32"), or null
    subjects: SubjectRecord per eager precision / backend x precision
    measurements: ComponentMeasurement or PipelineMeasurement per subject x point
    schedulers: SchedulerSummary per scheduler

latency_ms / step_ms: :class:`Stats`. Infinite PSNR (identical) is the string ``"inf"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import numpy as np

from diffship.configs.fields import parse, to_data
from diffship.errors import ConfigError

SCHEMA = "diffship.bench/1"
SCHEMA_FILE = Path(__file__).with_name("schema.json")
#: identity of a measurement across runs (``bench compare`` matches on it).
KEY_FIELDS = ("kind", "subject", "component", "batch", "height", "width", "steps", "scheduler")
#: a PSNR: dB, or "inf" / "nan" (JSON has no infinity).
Psnr = Union[float, str]


@dataclass(frozen=True)
class Stats:
    """Timings in milliseconds: median, p10, p90, mean, min over ``n`` calls."""

    median: float
    p10: float
    p90: float
    mean: float
    min: float
    n: int


def stats_ms(seconds: Iterable[float]) -> Stats | None:
    """:class:`Stats` of timings given in seconds; None when there are none."""
    values = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if values.size == 0:
        return None
    return Stats(median=float(np.median(values)), p10=float(np.percentile(values, 10)),
                 p90=float(np.percentile(values, 90)), mean=float(values.mean()), min=float(values.min()),
                 n=int(values.size))


def finite_or_text(value: float) -> Psnr:
    """JSON has no infinity: identical outputs (PSNR inf) are stored as ``"inf"``."""
    return value if math.isfinite(value) else str(value)


def psnr_value(value: Psnr | None) -> float | None:
    """A stored PSNR as a float (``"inf"`` -> ``math.inf``)."""
    return None if value is None else float(value)


@dataclass(frozen=True)
class ExportFigures:
    """One export, measured in its own process: wall time, peak memory (its own and its helper processes'),
    size on disk, and the components that fell back to fp32."""

    seconds: float
    peak_rss_bytes: int
    child_peak_rss_bytes: int
    size_bytes: int
    fp32_fallbacks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoadFigures:
    """Loading a subject in its worker: seconds, and the worker's RSS after it."""

    seconds: float
    rss_bytes: int | None


@dataclass(frozen=True)
class MemoryFigures:
    """A worker's memory as it stopped: peak and current RSS, peak CUDA memory where a GPU was used."""

    peak_rss_bytes: int
    rss_bytes: int | None
    peak_gpu_bytes: int | None


@dataclass
class SubjectRecord:
    """One subject (eager PyTorch at a precision, or one export) and what happened to it.

    Attributes:
        name / backend / precision: ``onnx-fp32``, ``onnx``, ``fp32``.
        folder: its export folder (None for eager PyTorch).
        origin: for an existing export measured as it is (``--compare``), the tool that wrote it
            (``diffship``, ``optimum-onnx``, ``optimum-intel``, ``apple-torch2coreml``); None for the run's own.
        runs: it was loaded and measured here.
        not_run / error: why it was not run (a platform reason), or how it failed.
        runtime: what computed it ("PyTorch ... eager", "onnxruntime ...", "MIL reference (Linux)").
        export / load / memory: figures of its export, load and worker.
        size_bytes: its weights on disk.
        tuned: for a ``BACKEND-tuned`` subject, the mode ``diffship tune`` chose (``full-int8@bf16``); its
            ``export`` figures are the whole tune's (its own exports and trials).
        compute: what its denoiser computes its products in (``fp32``, ``bf16``, ``int8``...): its rate is
            shown against that dtype's measured peak.
    """

    name: str
    backend: str
    precision: str
    folder: str | None = None
    origin: str | None = None
    runs: bool = False
    not_run: str | None = None
    error: str | None = None
    runtime: str | None = None
    export: ExportFigures | None = None
    load: LoadFigures | None = None
    size_bytes: int | None = None
    memory: MemoryFigures | None = None
    tuned: str | None = None
    compute: str | None = None


@dataclass(frozen=True)
class TensorParity:
    """A component's worst output (lowest PSNR) against the reference's on the same inputs."""

    psnr_db: Psnr
    max_abs: float
    cosine: float


@dataclass(frozen=True)
class ImageParity:
    """An end-to-end image against the reference subject's at the same seed."""

    psnr_db: Psnr
    ssim: float
    max_abs: float


@dataclass(frozen=True)
class ComponentMeasurement:
    """One component of one subject at one shape.

    Attributes:
        batch: images per call (the UNet runs twice that with guidance); height / width: the image size.
        latency_ms: timings of the interleaved calls; first_call_ms: the first call (OpenVINO compiles).
        flops / gflops_per_s: FLOPs of one call (counted on eager PyTorch) and the rate achieved.
        parity: outputs against the reference on the same inputs.
        skipped: why the subject could not take this shape (a fixed-shape export), instead of figures.
    """

    subject: str
    component: str
    batch: int
    height: int
    width: int
    latency_ms: Stats | None
    first_call_ms: float | None
    flops: int | None
    gflops_per_s: float | None
    parity: TensorParity | None
    skipped: str | None = None
    steps: None = None
    scheduler: None = None
    kind: Literal["component"] = "component"


@dataclass(frozen=True)
class PipelineMeasurement:
    """One end-to-end generation setting of one subject.

    Attributes:
        steps / scheduler: as requested (``default`` is the pipeline's own scheduler); scheduler_class: what ran.
        latency_ms: the whole call; step_ms: per denoising-loop iteration; unet_calls: iterations of the loop.
        component_ms: the run's time split by component: each one's calls during the generation together
            (median over the timed runs, ms); the rest of ``latency_ms`` is the pipeline's own work.
        steps_per_s: steps over the median latency.
        parity: the first image against the reference subject's.
        skipped: why the subject could not take this setting, instead of figures.
    """

    subject: str
    batch: int
    height: int
    width: int
    steps: int
    scheduler: str
    latency_ms: Stats | None
    scheduler_class: str | None
    step_ms: Stats | None
    unet_calls: int | None
    steps_per_s: float | None
    parity: ImageParity | None
    skipped: str | None = None
    component_ms: dict[str, float] | None = None
    component: None = None
    kind: Literal["pipeline"] = "pipeline"


Measurement = Union[ComponentMeasurement, PipelineMeasurement]


@dataclass(frozen=True)
class SchedulerSummary:
    """Per scheduler: UNet calls per step, and the fewest measured steps whose image is within
    ``CONVERGED_PSNR`` of the image at the most measured steps (on the reference subject)."""

    scheduler: str
    scheduler_class: str | None
    subject: str | None
    unet_calls_per_step: float
    steps_needed: int | None
    psnr_by_steps: dict[str, Psnr]


@dataclass
class BenchResults:
    """A whole run (see the module docstring)."""

    created: str
    command: str | None
    settings: dict[str, Any]
    machine: dict[str, Any]
    subjects: list[SubjectRecord]
    source: dict[str, Any] | None = None
    reference: str | None = None
    measurements: list[Measurement] = field(default_factory=list)
    schedulers: list[SchedulerSummary] = field(default_factory=list)
    complete: bool = False
    schema: str = SCHEMA

    def to_data(self) -> dict[str, Any]:
        """The JSON form (``schema.json``)."""
        return to_data(self)

    def subject(self, name: str) -> SubjectRecord:
        return next(s for s in self.subjects if s.name == name)

    def find(self, **where: Any) -> list[Measurement]:
        """Measurements whose fields equal ``where``."""
        return [m for m in self.measurements if all(getattr(m, k) == v for k, v in where.items())]

    def denoiser(self) -> tuple[str, str]:
        """The denoiser's component name and its label in tables: the UNet, or the transformer of the
        SD3 and Flux families."""
        if any(getattr(m, "component", None) == "transformer" for m in self.measurements):
            return "transformer", "transformer"
        return "unet", "UNet"

    def default_point(self) -> dict[str, Any]:
        """The default request: first size, first batch, first step count, first scheduler."""
        st = self.settings
        height, width = (int(v) for v in st["sizes"][0].split("x"))
        return {"batch": st["batches"][0], "height": height, "width": width, "steps": st["steps"][0],
                "scheduler": st["schedulers"][0]}


def key(measurement: Measurement) -> tuple:
    """What identifies a measurement across runs (:data:`KEY_FIELDS`)."""
    return tuple(getattr(measurement, f) for f in KEY_FIELDS)


def read_results(path: Path) -> BenchResults:
    """A results file, checked to be a diffship benchmark of this schema and typed (every key validated)."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read benchmark results ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ConfigError(f"{path}: not a diffship benchmark result (schema {SCHEMA}); "
                          f"found {doc.get('schema') if isinstance(doc, dict) else type(doc).__name__!r}")
    return parse(BenchResults, doc, "key", where=str(path))

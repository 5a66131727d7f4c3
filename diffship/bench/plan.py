"""What a run measures and in which order: its subjects, their exports, the points of every sweep, and
the memory groups that subjects too large to load together are measured in."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffship import backends
from diffship._files import folder_bytes
from diffship.bench.machine import bf16_native, peak_rss_bytes
from diffship.bench.records import ExportFigures, SubjectRecord
from diffship.bench.worker import Subject
from diffship.configs.bench_presets import AUTO, TORCH, TUNED, BenchSettings
from diffship.errors import ConfigError


@dataclass
class Planned:
    """A subject and what happened to it so far (its record in the results)."""

    subject: Subject
    entry: SubjectRecord


def plan(settings: BenchSettings) -> list[Planned]:
    """The subjects of a run: eager precisions first (the first is the parity reference), then exports."""
    known = [TORCH, *backends.names()]
    names: list[str] = []
    for b in settings.backends:
        for name in ([TORCH, *backends.installed()] if b == AUTO else [b]):
            if name not in known:
                raise ConfigError(f"unknown backend {name!r} in --backends; choose from: {', '.join(known)}, {AUTO}")
            if name not in names:
                names.append(name)
    planned = []
    for name in names:
        if name == TORCH:
            for precision in sorted(settings.torch_precisions, key=lambda x: x != "fp32"):
                entry = SubjectRecord(f"torch-{precision}", TORCH, precision)
                if precision == "bf16" and not bf16_native(settings.device):
                    entry.not_run = f"no native bf16 on this {settings.device} (PyTorch would emulate it)"
                planned.append(Planned(Subject(entry.name, TORCH, precision), entry))
            continue
        record = backends.get(name)
        record.require()  # a missing package raises here, naming the pip extra
        for precision in settings.precisions:
            entry = SubjectRecord(f"{name}-{precision}", name, precision)
            if precision not in record.precisions:
                entry.not_run = f"{name} has no {precision} precision ({', '.join(record.precisions)})"
            planned.append(Planned(Subject(entry.name, name, precision,
                                           options=dict(settings.runtime_options.get(name, {}))), entry))
    for name in settings.tune:
        backends.get(name).require(runtime=True)
        entry = SubjectRecord(f"{name}-{TUNED}", name, TUNED)
        planned.append(Planned(Subject(entry.name, name, TUNED), entry))
    planned += compared(settings, {p.subject.name for p in planned})
    return sorted(planned, key=lambda p: p.subject.backend != TORCH)  # eager fp32 first: the reference


def compared(settings: BenchSettings, taken: set[str]) -> list[Planned]:
    """The ``compare`` folders as subjects, measured as they are: each named by its folder (made unique),
    with its backend, precision and origin from its manifest (or, for another tool's folder, from what
    :func:`~diffship.backends.manifest.read_manifest` reads of it).

    Raises:
        ConfigError: a folder exported from another source than the run's (where its manifest says).
    """
    from diffship.backends.manifest import read_manifest
    from diffship.reference.loader import fingerprint, resolve_source

    out, source = [], None
    for folder in settings.compare:
        manifest = read_manifest(folder)
        if manifest.source.fingerprint and source is None:  # hashes every source file: once per run
            source = fingerprint(resolve_source(settings.source)[0])
        if manifest.source.fingerprint and manifest.source.fingerprint != source:
            raise ConfigError(f"--compare {folder} was exported from {manifest.source.name!r}, not from "
                              f"{settings.source!r}; measure an export beside its own source")
        name = Path(folder).name
        while name in taken:
            name += "+"
        taken.add(name)
        entry = SubjectRecord(name, manifest.backend, manifest.precision, folder=str(folder), origin=manifest.origin)
        entry.size_bytes = folder_bytes(Path(folder))
        out.append(Planned(Subject(name, manifest.backend, manifest.precision, folder=str(folder),
                                   options=dict(settings.runtime_options.get(manifest.backend, {}))), entry))
    return out


def measured_export(source: str, folder: str, backend: str, precision: str, static: tuple[int, int] | None,
                    options: dict[str, Any], components: list[str] | None = None,
                    calibration_size: tuple[int, int] | None = None,
                    calibration_steps: int | None = None) -> ExportFigures:
    """Export in this (child) process and report its time, peak memory and size on disk."""
    from diffship.reference.memory import return_large_frees
    from diffship.workflows import export_pipeline

    return_large_frees()  # as `diffship export` does: this child only exports
    start = time.perf_counter()
    manifest = export_pipeline(source, folder, backend=backend, precision=precision, static=static, overwrite=True,
                               backend_options=options, components=components, calibration_size=calibration_size,
                               calibration_steps=calibration_steps)
    return _figures(start, folder, manifest)


def _figures(start: float, folder: str, manifest: Any) -> ExportFigures:
    """What a (child) process that wrote ``folder`` since ``start`` measured."""
    return ExportFigures(seconds=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(),
                         child_peak_rss_bytes=peak_rss_bytes(children=True), size_bytes=folder_bytes(Path(folder)),
                         fp32_fallbacks=sorted(n for n, c in manifest.components.items() if c.details.fp32_fallback))


def export_subject(p: Planned, settings: BenchSettings, exports: Path, reuse: bool) -> None:
    """Export one subject in a child process (its figures are its own), or reuse an existing export."""
    from diffship._isolate import run_isolated
    from diffship.backends.manifest import MANIFEST, read_manifest

    folder = exports / p.subject.name
    p.entry.folder = str(folder)
    if reuse and (folder / MANIFEST).is_file():
        manifest = read_manifest(folder, verify=False)
        if (manifest.source.name, manifest.backend, manifest.precision) == (
                settings.source, p.subject.backend, p.subject.precision):
            p.entry.size_bytes = folder_bytes(folder)
            return
    static = settings.size if backends.get(p.subject.backend).fixed_shapes else None
    # calibrated precisions calibrate at the size and steps the run measures (as tune does), not the defaults
    figures = run_isolated(f"exporting {settings.source} to {p.subject.name}", measured_export, settings.source,
                           str(folder), p.subject.backend, p.subject.precision, static,
                           dict(settings.export_options.get(p.subject.backend, {})), list(settings.components) or None,
                           settings.size, settings.steps[0])
    p.entry.export = figures
    p.entry.size_bytes = figures.size_bytes


def measured_tune(source: str, folder: str, backend: str, exports: dict[str, str],
                  settings: BenchSettings) -> tuple[ExportFigures, str, str]:
    """``diffship tune`` in this (child) process: its figures (the whole tune: exports and trials), the mode
    it chose and that mode's precision."""
    from diffship.backends.manifest import read_manifest
    from diffship.bench.tune import tune

    start = time.perf_counter()
    result = tune(source, folder, backend, min_psnr=settings.tune_min_psnr, size=settings.size,
                  steps=settings.default_steps, repeats=settings.repeats, only=list(settings.tune_candidates) or None,
                  overwrite=True, exports=exports)
    manifest = read_manifest(folder, verify=False)
    return _figures(start, folder, manifest), result.chosen, manifest.precision


def tune_subject(p: Planned, settings: BenchSettings, exports: Path, planned: list[Planned], reuse: bool) -> None:
    """Make a ``BACKEND-tuned`` subject with ``diffship tune`` in a child process, reusing the run's exports
    of the same backend (or, with ``reuse``, an existing tuned export of the same source)."""
    from diffship._isolate import run_isolated
    from diffship.backends.manifest import MANIFEST, read_manifest
    from diffship.bench.tune import TABLE_JSON

    backend = p.subject.backend
    folder = exports / p.subject.name
    p.entry.folder = str(folder)
    if reuse and (folder / TABLE_JSON).is_file() and (folder / MANIFEST).is_file():
        manifest = read_manifest(folder, verify=False)
        if (manifest.source.name, manifest.backend) == (settings.source, backend):
            p.entry.precision = manifest.precision
            p.entry.tuned = json.loads((folder / TABLE_JSON).read_text())["chosen"]
            p.entry.size_bytes = folder_bytes(folder)
            return
    made = {q.subject.precision: q.entry.folder for q in planned
            if q.subject.backend == backend and q.subject.precision != TUNED and not q.entry.origin
            and not q.entry.error and q.entry.folder and (Path(q.entry.folder) / MANIFEST).is_file()}
    figures, chosen, precision = run_isolated(f"tuning {settings.source} on {backend}", measured_tune,
                                              settings.source, str(folder), backend, made, settings)
    p.entry.export, p.entry.size_bytes = figures, figures.size_bytes
    p.entry.tuned, p.entry.precision = chosen, precision


def component_points(settings: BenchSettings, components: list[str]) -> list[tuple[str, int, int, int]]:
    """(component, batch, height, width): the batch sweep at the default size, the size sweep at the first
    batch. The text encoder does not depend on the image size; the VAE encoder (image-to-image only) is
    measured at the default request."""
    h, w = settings.size
    points = [(b, h, w) for b in settings.batches] + [(settings.batches[0], *s) for s in settings.sizes[1:]]
    out = []
    for name in components:
        for b, hh, ww in points:
            if name.startswith("text_encoder") and (hh, ww) != (h, w):
                continue
            if name == "vae_encoder" and (b, hh, ww) != (settings.batches[0], h, w):
                continue
            out.append((name, b, hh, ww))
    return out


def pipeline_points(settings: BenchSettings) -> list[dict[str, Any]]:
    """The scheduler x steps grid at the default request, then the batch and size sweeps."""
    h, w = settings.size
    base = {"batch": settings.batches[0], "height": h, "width": w}
    points = [{**base, "steps": n, "scheduler": s} for s in settings.schedulers for n in settings.steps]
    points += [{**base, "batch": b, "steps": settings.default_steps, "scheduler": settings.schedulers[0]}
               for b in settings.batches[1:]]
    points += [{**base, "height": hh, "width": ww, "steps": settings.default_steps, "scheduler": settings.schedulers[0]}
               for hh, ww in settings.sizes[1:]]
    return points


def _footprint(p: Planned, source_bytes: int) -> int:
    """Expected resident memory of a loaded subject: its weights (eager bf16 converts from fp32, so it
    peaks at the fp32 size; runtimes keep a copy plus work buffers) and the libraries."""
    if p.subject.backend == TORCH:
        weights = source_bytes
    else:
        weights = int(folder_bytes(Path(p.entry.folder)) * 1.25)
    return weights + _WORKER_BASE


#: memory of a worker before its weights: interpreter, torch, diffusers and a runtime.
_WORKER_BASE = 700 * 2**20
#: share of the memory available when the run starts that its workers may use together.
_MEMORY_SHARE = 0.8


def memory_groups(runnable: list[Planned], source_bytes: int) -> list[list[Planned]]:
    """Subjects that fit in memory together, each group led by the reference (eager fp32) so every ratio
    comes from interleaved runs. Page-cache-backed weights (safetensors, OpenVINO) that do not fit are
    re-read from disk on every call, which would make a figure measure the disk.

    Args:
        runnable: the subjects to measure, the reference first.
        source_bytes: the eager source's weights on disk (an eager subject's footprint).
    """
    from diffship.reference.memory import available_memory_bytes

    if not runnable:
        return []
    budget = int((available_memory_bytes() or 1 << 62) * _MEMORY_SHARE)
    lead, rest = runnable[0], runnable[1:]
    room = budget - _footprint(lead, source_bytes)
    groups: list[list[Planned]] = [[lead]]
    used = 0
    for p in rest:
        need = _footprint(p, source_bytes)
        if len(groups[-1]) > 1 and used + need > room:
            groups.append([lead])
            used = 0
        groups[-1].append(p)
        used += need
    return groups

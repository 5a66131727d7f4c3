"""The benchmark run: export every subject, load each in its own worker, measure in interleaved turns.

Order of a run:

1. **exports** -- each backend x precision is exported in a child process, which reports its wall time
   and peak RSS (and its helper processes': ONNX checker, TensorRT builder) (:mod:`~.plan`); then
   ``diffship tune`` makes each ``BACKEND-tuned`` subject (``--tune``), reusing those exports;
2. **loads** -- one worker process per subject loads its pipeline (timed), eager PyTorch included;
   subjects that do not fit in memory together are measured in groups, each led by eager fp32
   (:func:`~diffship.bench.plan.memory_groups`), and steps 3-5 run per group;
3. **components** -- every component at every shape of the sweeps: warm-up calls, then ``repeats``
   rounds in which each subject makes one timed call, the order rotating each round (:mod:`~.pool`);
4. **end to end** -- full pipeline calls for the scheduler x steps grid and the batch and size sweeps,
   in rounds like the components (after the component phase compiled any per-shape graphs);
5. **memory** -- each worker's peak RSS (and CUDA memory) as it stops.

Results are written after every measurement, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffship import backends
from diffship._files import folder_bytes, remove_folder
from diffship.bench.analysis import image_parity, point_key, scheduler_summary, tensor_parity
from diffship.bench.machine import machine_info
from diffship.bench.output import write_all
from diffship.bench.plan import (Planned, component_points, export_subject, memory_groups, pipeline_points, plan,
                                 tune_subject)
from diffship.bench.pool import Worker, series
from diffship.bench.records import (BenchResults, ComponentMeasurement, LoadFigures, MemoryFigures,
                                    PipelineMeasurement, stats_ms)
from diffship.configs.bench_presets import TORCH, TUNED, BenchSettings
from diffship.errors import DiffshipError, first_line


class Progress:
    """What a run reports while it goes; the CLI draws progress bars from it. Default: silent."""

    def phase(self, name: str, total: int) -> None: ...

    def advance(self, text: str = "") -> None: ...

    def note(self, text: str) -> None: ...


def run_bench(settings: BenchSettings, out: str | Path, *, exports: str | Path | None = None, reuse_exports: bool = False,
              keep_exports: bool = True, command: str | None = None, progress: Progress | None = None) -> BenchResults:
    """Benchmark eager PyTorch and exports of one source; write results to ``out``.

    Args:
        settings: what to measure (see :class:`BenchSettings`; presets in ``configs/bench_presets.toml``).
        out: folder for results.json, results.csv, results.md, the plots and sample images.
        exports: where exports are written (default ``out/exports``).
        reuse_exports: keep an existing export of the same source, backend and precision (no export
            figures are recorded for it).
        keep_exports: False: remove each export this run wrote once its subject is measured (as each
            memory group finishes; with ``export_only``, once its figures are taken), so a run needs the
            disk of one group's exports at a time. Reused exports always stay.
        command: the command line, recorded in the results.
        progress: receives phases and steps (for progress bars).

    Returns:
        The results (also in ``out/results.json``); ``complete`` is True when every phase ran.
    """
    from diffship.backends.manifest import library_versions
    from diffship.reference.loader import resolve_source

    settings.validate()
    progress = progress or Progress()
    out = Path(out)
    exports = Path(exports) if exports else out / "exports"
    planned = plan(settings)
    used = {p.subject.backend for p in planned} - {TORCH}
    versions = library_versions({k: v for name in sorted(used) for k, v in backends.get(name).versions().items()})
    doc = BenchResults(created=datetime.datetime.now(datetime.timezone.utc).isoformat(), command=command,
                       settings=settings.to_dict(), machine=machine_info(versions), subjects=[p.entry for p in planned])
    run = _Run(settings, out, doc, progress)
    run.save()
    try:
        progress.phase("preparing the source", 1)
        progress.advance(settings.source)
        source_folder, _ = resolve_source(settings.source)  # builds a preset on first use, so no export pays for it
        source_bytes = folder_bytes(source_folder)
        if settings.export_only:
            for p in planned:
                p.entry.not_run = p.entry.not_run or ("eager PyTorch has no export" if p.subject.backend == TORCH
                                                      else None)
        to_export = [p for p in planned if p.subject.backend != TORCH and not p.entry.not_run and not p.entry.origin
                     and p.subject.precision != TUNED]
        progress.phase("exporting", len(to_export))
        for p in to_export:
            progress.advance(f"exporting {p.subject.name}")
            try:
                export_subject(p, settings, exports, reuse_exports)
            except DiffshipError as exc:
                p.entry.error = f"export failed: {first_line(exc)}"
                progress.note(f"{p.subject.name}: {p.entry.error}")
            run.save()
            if settings.export_only and not keep_exports:
                _remove_exports([p], progress)
        to_tune = [p for p in planned if p.subject.precision == TUNED and not p.entry.origin]
        if to_tune:
            progress.phase("tuning", len(to_tune))
        for p in to_tune:
            progress.advance(f"diffship tune {settings.source} --backend {p.subject.backend}")
            try:
                tune_subject(p, settings, exports, planned, reuse_exports)
            except DiffshipError as exc:
                p.entry.error = f"tune failed: {first_line(exc)}"
                progress.note(f"{p.subject.name}: {p.entry.error}")
            run.save()
        for p in [p for p in planned if p.subject.backend != TORCH and not p.entry.not_run and not p.entry.error]:
            if settings.export_only:
                p.entry.not_run = "export only (--export-only)"
            elif not p.entry.error and (reason := backends.runtime_unavailable_reason(p.subject.backend)):
                p.entry.not_run = reason
        runnable = [p for p in planned if not p.entry.not_run and not p.entry.error]
        groups = memory_groups(runnable, source_bytes)
        if len(groups) > 1:
            progress.note(f"the subjects do not fit in memory together; measuring them in {len(groups)} groups, "
                          f"each with {groups[0][0].subject.name}")
        for i, group in enumerate(groups):
            run.measure(group, f" ({i + 1}/{len(groups)})" if len(groups) > 1 else "", first=i == 0,
                        source_bytes=source_bytes)
            if not keep_exports:
                _remove_exports(group, progress)
        if not keep_exports:  # those no group measured: not runnable here (TensorRT without a GPU), or failed
            _remove_exports(planned, progress)
        if not settings.export_only and not any(s.runs for s in doc.subjects):
            raise DiffshipError("no subject could be loaded; see the errors in " + str(out / "results.json"))
        doc.schedulers = scheduler_summary(doc, run.images)
        doc.complete = True
    finally:
        run.save(final=True)
    return doc


def _remove_exports(subjects: list[Planned], progress: Progress) -> None:
    """Remove the exports this run wrote for ``subjects`` (those with export figures: not reused, not
    ``--compare`` folders); the results keep their figures and sizes."""
    for p in subjects:
        folder = Path(p.entry.folder) if p.entry.folder else None
        if p.entry.export is None or p.entry.origin or folder is None or not folder.is_dir():
            continue
        if remove_folder(folder):
            progress.note(f"removed the export {folder} ({p.entry.size_bytes / 1e9:.2f} GB; --keep-exports keeps "
                          f"exports)")


class _Run:
    """One run's state: the results, the reference's kept images, saving."""

    def __init__(self, settings: BenchSettings, out: Path, doc: BenchResults, progress: Progress):
        self.settings, self.out, self.doc, self.progress = settings, out, doc, progress
        self.images: dict[tuple, Any] = {}

    def save(self, final: bool = False) -> None:
        write_all(self.doc, self.out, final)

    def measure(self, group: list[Planned], label: str, first: bool, source_bytes: int) -> None:
        """Load one group of workers, measure every point, stop them. The group's lead (the reference)
        is measured again in later groups, for interleaving and parity; only its first figures are kept."""
        settings, doc, progress = self.settings, self.doc, self.progress
        self.workers: list[Worker] = []
        self.components: list[str] = []
        try:
            progress.phase(f"loading{label}", len(group))
            for p in group:
                progress.advance(f"loading {p.subject.name}")
                self._load(p, record=first or p is not group[0], source_bytes=source_bytes)
            if not self.workers:
                return
            lead = self.workers[0].planned.subject
            if first:
                # Parity is against eager fp32; without it (not requested, or it failed) none is measured.
                doc.reference = lead.name if (lead.backend, lead.precision) == (TORCH, "fp32") else None
            keep = {w.name for w in self.workers if first or w.name != group[0].subject.name}
            points = component_points(settings, self.components)
            progress.phase(f"components{label}", len(points))
            for name, batch, height, width in points:
                progress.advance(f"{name} batch {batch} {height}x{width}")
                self._component(name, {"batch_size": batch, "height": height, "width": width, "guidance": True}, keep)
            e2e = pipeline_points(settings)
            progress.phase(f"end to end{label}", len(e2e))
            for point in e2e:
                progress.advance(f"{point['scheduler']} {point['steps']} steps, batch {point['batch']} "
                                 f"{point['height']}x{point['width']}")
                self._pipeline(point, keep)
        finally:
            for w in self.workers:
                memory = w.stop()
                entry = w.planned.entry
                if memory and (entry.memory is None or memory["peak_rss_bytes"] > entry.memory.peak_rss_bytes):
                    entry.memory = MemoryFigures(**memory)
            self.save()

    def _load(self, p: Planned, record: bool, source_bytes: int) -> None:
        worker_settings = {"source": self.settings.source, "device": self.settings.device,
                           "threads": self.settings.threads}
        worker = Worker(replace(p, subject=replace(p.subject, folder=p.entry.folder)), worker_settings)
        status, value = worker.reply()
        if status != "ok":
            p.entry.error = value
            self.progress.note(f"{p.subject.name}: {value}")
            worker.stop()
            return
        if record:
            p.entry.runs = True
            p.entry.runtime = value["runtime"]
            p.entry.compute = value["compute"]
            p.entry.load = LoadFigures(seconds=value["load_seconds"], rss_bytes=value["rss_bytes"])
            if p.subject.backend == TORCH:
                p.entry.size_bytes = source_bytes
        self.doc.source = self.doc.source or value["source"]
        self.components = self.components or value["components"]
        self.workers.append(worker)
        self.save()

    def _dead(self, w: Worker, why: str) -> None:
        w.planned.entry.error = why
        self.workers.remove(w)
        self.progress.note(f"{w.name}: {why}")

    def _flops(self, component: str, profile: dict[str, Any]) -> int | None:
        """FLOPs of one call, counted by torch's FlopCounterMode (matmuls, convolutions, attention) on the
        eager reference; None where it cannot count."""
        if not self.doc.reference or not self.workers:
            return None
        status, value = self.workers[0].request("flops", component, profile)
        return value if status == "ok" else None

    def _component(self, name: str, profile: dict[str, Any], keep: set[str]) -> None:
        settings, doc = self.settings, self.doc
        found = series(list(self.workers), lambda k: ("component", name, profile, 1, k), settings.warmup,
                       settings.repeats, self._dead)
        flops = self._flops(name, profile)
        ref = found.get(doc.reference or "", {}).get("kept")
        for subject, s in found.items():
            if subject not in keep:
                continue
            latency = stats_ms(s["seconds"])
            doc.measurements.append(ComponentMeasurement(
                subject=subject, component=name, batch=profile["batch_size"], height=profile["height"],
                width=profile["width"], skipped=s["skipped"] if not s["seconds"] else None, latency_ms=latency,
                first_call_ms=s["first"] and s["first"] * 1e3, flops=flops,
                gflops_per_s=flops / 1e9 / (latency.median / 1e3) if flops and latency else None,
                parity=tensor_parity(ref["outputs"], s["kept"]["outputs"])
                if ref and s["kept"] and subject != doc.reference else None,
            ))
        self.save()

    def _pipeline(self, point: dict[str, Any], keep: set[str]) -> None:
        settings, doc = self.settings, self.doc
        request = {**point, "prompt": settings.prompt, "seed": settings.seed, "guidance_scale": settings.guidance_scale}
        found = series(list(self.workers), lambda k: ("pipeline", request, k), 0, settings.e2e_repeats, self._dead)
        ref = found.get(doc.reference or "", {}).get("kept")
        for subject, s in found.items():
            if subject not in keep:
                continue
            kept = s["kept"] or {}
            latency = stats_ms(s["seconds"])
            parity = None
            if kept.get("image") is not None:
                self.images[(subject, *point_key(point))] = kept["image"]
                _save_image(self.out, subject, point, kept["image"])
                if ref and subject != doc.reference:
                    parity = image_parity(ref["image"], kept["image"])
            doc.measurements.append(PipelineMeasurement(
                subject=subject, **point, skipped=s["skipped"] if not s["seconds"] else None, latency_ms=latency,
                scheduler_class=kept.get("scheduler_class"), step_ms=stats_ms(kept.get("step_seconds", [])),
                unet_calls=kept.get("unet_calls"), component_ms=_split_ms(s["parts"]),
                steps_per_s=point["steps"] / (latency.median / 1e3) if latency else None, parity=parity,
            ))
        self.save()


def _split_ms(parts: list[dict[str, float]]) -> dict[str, float] | None:
    """Each component's median milliseconds over the timed runs (the components every run used)."""
    import statistics

    if not parts:
        return None
    names = [name for name in parts[0] if all(name in p for p in parts)]
    return {name: round(statistics.median(p[name] for p in parts) * 1e3, 1) for name in names} or None


def _save_image(out: Path, subject: str, point: dict[str, Any], image: Any) -> None:
    import numpy as np
    from PIL import Image

    from diffship._files import atomic_write, png_bytes

    name = f"{point['scheduler']}-{point['steps']}steps-b{point['batch']}-{point['height']}x{point['width']}.png"
    pixels = (np.clip(image, 0, 1) * 255).round().astype("uint8")
    atomic_write(out / "images" / subject / name, png_bytes(Image.fromarray(pixels)))

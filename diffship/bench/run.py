"""The benchmark run: export every subject, load each in its own worker, measure in interleaved turns.

Order of a run:

1. **exports** -- each backend x precision is exported in a child process, which reports its wall time
   and peak RSS (and its helper processes': ONNX checker, TensorRT builder);
2. **loads** -- one worker process per subject loads its pipeline (timed), eager PyTorch included;
   subjects that do not fit in memory together are measured in groups, each led by eager fp32
   (:func:`memory_groups`), and steps 3-5 run per group;
3. **components** -- every component at every shape of the sweeps: warm-up calls, then ``repeats``
   rounds in which each subject makes one timed call, the order rotating each round;
4. **end to end** -- full pipeline calls for the scheduler x steps grid and the batch and size sweeps,
   in rounds like the components (after the component phase compiled any per-shape graphs);
5. **memory** -- each worker's peak RSS (and CUDA memory) as it stops.

Results are written after every measurement, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import datetime
import multiprocessing
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from diffship.bench.machine import bf16_native, folder_bytes, machine_info, peak_rss_bytes
from diffship.bench.results import CONVERGED_PSNR, SCHEMA, finite_or_text, stats_ms, write_all
from diffship.bench.settings import AUTO, TORCH, BenchSettings
from diffship.bench.worker import Subject, serve
from diffship.errors import ConfigError, DiffshipError, first_line


class Progress:
    """What a run reports while it goes; the CLI draws progress bars from it. Default: silent."""

    def phase(self, name: str, total: int) -> None: ...

    def advance(self, text: str = "") -> None: ...

    def note(self, text: str) -> None: ...


# --- subjects ---------------------------------------------------------------------------------------------


@dataclass
class Planned:
    """A subject and what happened to it so far (the ``subjects`` entry of the results)."""

    subject: Subject
    entry: dict[str, Any]


def plan(settings: BenchSettings) -> list[Planned]:
    """The subjects of a run: eager precisions first (the first is the parity reference), then exports."""
    from diffship.exporters import available_backends, backend_module, backends

    known = [TORCH, *backends()]
    names: list[str] = []
    for b in settings.backends:
        for name in ([TORCH, *available_backends()] if b == AUTO else [b]):
            if name not in known:
                raise ConfigError(f"unknown backend {name!r} in --backends; choose from: {', '.join(known)}, {AUTO}")
            if name not in names:
                names.append(name)
    planned = []
    for name in names:
        if name == TORCH:
            for precision in sorted(settings.torch_precisions, key=lambda x: x != "fp32"):
                entry = _entry(f"torch-{precision}", TORCH, precision)
                if precision == "bf16" and not bf16_native(settings.device):
                    entry["not_run"] = f"no native bf16 on this {settings.device} (PyTorch would emulate it)"
                planned.append(Planned(Subject(entry["name"], TORCH, precision), entry))
            continue
        mod = backend_module(name)  # a missing package raises here, naming the pip extra
        for precision in settings.precisions:
            entry = _entry(f"{name}-{precision}", name, precision)
            if precision not in mod.PRECISIONS:
                entry["not_run"] = f"{name} has no {precision} precision ({', '.join(mod.PRECISIONS)})"
            planned.append(Planned(Subject(entry["name"], name, precision,
                                           options=dict(settings.runtime_options.get(name, {}))), entry))
    return sorted(planned, key=lambda p: p.subject.backend != TORCH)  # eager fp32 first: the reference


def _entry(name: str, backend: str, precision: str) -> dict[str, Any]:
    return {"name": name, "backend": backend, "precision": precision, "folder": None, "runs": False,
            "not_run": None, "error": None, "runtime": None, "export": None, "load": None, "size_bytes": None,
            "memory": None}


def measured_export(source: str, folder: str, backend: str, precision: str, static: tuple[int, int] | None,
                    options: dict[str, Any], components: list[str] | None = None) -> dict[str, Any]:
    """Export in this (child) process and report its time, peak memory and size on disk."""
    from diffship.exporters import export_pipeline

    start = time.perf_counter()
    manifest = export_pipeline(source, folder, backend=backend, precision=precision, static=static, overwrite=True,
                               backend_options=options, components=components)
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(),
            "child_peak_rss_bytes": peak_rss_bytes(children=True), "size_bytes": folder_bytes(Path(folder)),
            "fp32_fallbacks": sorted(n for n, c in manifest["components"].items() if "fp32_fallback" in c["details"])}


def _export(p: Planned, settings: BenchSettings, exports: Path, reuse: bool) -> None:
    from diffship._isolate import run_isolated
    from diffship.exporters import backend_module
    from diffship.manifest import MANIFEST, read_manifest

    folder = exports / p.subject.name
    p.entry["folder"] = str(folder)
    if reuse and (folder / MANIFEST).is_file():
        manifest = read_manifest(folder, verify=False)
        if (manifest["source"]["name"], manifest["backend"], manifest["precision"]) == (
                settings.source, p.subject.backend, p.subject.precision):
            p.entry["size_bytes"] = folder_bytes(folder)
            return
    static = settings.size if getattr(backend_module(p.subject.backend), "FIXED_SHAPES", False) else None
    result = run_isolated(f"exporting {settings.source} to {p.subject.name}", measured_export, settings.source,
                          str(folder), p.subject.backend, p.subject.precision, static,
                          dict(settings.export_options.get(p.subject.backend, {})), list(settings.components) or None)
    p.entry["export"] = result
    p.entry["size_bytes"] = result["size_bytes"]


# --- workers ----------------------------------------------------------------------------------------------


class Worker:
    """A subject's process and the pipe to it. Requests are numbered and replies carry the number, so a
    reply left over from an interrupted request is never taken for the next one's."""

    def __init__(self, planned: Planned, settings: dict[str, Any]):
        ctx = multiprocessing.get_context("spawn")
        self.planned = planned
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, planned.subject, settings), name=planned.subject.name)
        self.proc.start()
        child.close()
        self.sent = 0  # the load reply is number 0

    @property
    def name(self) -> str:
        return self.planned.subject.name

    def reply(self) -> tuple[str, Any]:
        try:
            while True:
                number, status, value = self.conn.recv()
                if number == self.sent:
                    return status, value
        except (EOFError, OSError):
            self.proc.join(10)
            code = self.proc.exitcode
            why = "killed (SIGKILL), most likely out of memory" if code == -9 else f"exit code {code}"
            return "died", f"worker process ended: {why}"

    def request(self, *message: Any) -> tuple[str, Any]:
        self.sent += 1
        try:
            self.conn.send((self.sent, *message))
        except (OSError, ValueError):
            return "died", "worker process is gone"
        return self.reply()

    def stop(self) -> dict[str, Any] | None:
        """Ask for the worker's memory figures and end it (killed if it does not end by itself)."""
        status, value = self.request("stop") if self.proc.is_alive() else ("died", None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        return value if status == "ok" else None


# --- measurement ------------------------------------------------------------------------------------------


def _rounds(workers: list[Worker], repeats: int) -> Iterator[tuple[int, Worker]]:
    """Each round every worker once; the order rotates so no subject always runs right after another."""
    for r in range(repeats):
        k = r % max(len(workers), 1)
        for w in workers[k:] + workers[:k]:
            yield r, w


def _series(workers: list[Worker], message: Callable[[bool], tuple], warmup: int, repeats: int,
            dead: Callable[[Worker, str], None]) -> dict[str, dict[str, Any]]:
    """Warm-up calls, then ``repeats`` interleaved timed calls; per worker its times, the last call's
    kept values, and a skip reason if it cannot take the request."""
    series: dict[str, dict[str, Any]] = {w.name: {"seconds": [], "first": None, "kept": None, "skipped": None}
                                         for w in workers}
    active = list(workers)

    def call(w: Worker, keep: bool) -> dict[str, Any] | None:
        status, value = w.request(*message(keep))
        if status == "ok":
            return value
        if status == "died":
            dead(w, value)
            series[w.name]["skipped"] = f"error: {value}"
        else:
            series[w.name]["skipped"] = value if status == "skip" else f"error: {value}"
        active.remove(w)
        return None

    for w in list(active):
        for i in range(warmup):
            value = call(w, False)
            if value is None:
                break
            if i == 0:
                series[w.name]["first"] = _seconds(value)[0]
    for r, w in _rounds(list(active), repeats):
        if w not in active:
            continue
        value = call(w, r == repeats - 1)
        if value is not None:
            series[w.name]["seconds"] += _seconds(value)
            if r == repeats - 1:
                series[w.name]["kept"] = value
            if series[w.name]["first"] is None:
                series[w.name]["first"] = _seconds(value)[0]
    return series


def _seconds(value: dict[str, Any]) -> list[float]:
    s = value["seconds"]
    return list(s) if isinstance(s, list) else [s]


def _component_points(settings: BenchSettings, components: list[str]) -> list[tuple[str, int, int, int]]:
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


def _pipeline_points(settings: BenchSettings) -> list[dict[str, Any]]:
    """The scheduler x steps grid at the default request, then the batch and size sweeps."""
    h, w = settings.size
    base = {"batch": settings.batches[0], "height": h, "width": w}
    points = [{**base, "steps": n, "scheduler": s} for s in settings.schedulers for n in settings.steps]
    points += [{**base, "batch": b, "steps": settings.default_steps, "scheduler": settings.schedulers[0]}
               for b in settings.batches[1:]]
    points += [{**base, "height": hh, "width": ww, "steps": settings.default_steps, "scheduler": settings.schedulers[0]}
               for hh, ww in settings.sizes[1:]]
    return points


def _flops(reference: Worker, component: str, profile: dict[str, Any]) -> int | None:
    """FLOPs of one call, counted by torch's FlopCounterMode (matmuls, convolutions, attention) on the
    eager reference; None where it cannot count."""
    status, value = reference.request("flops", component, profile)
    return value if status == "ok" else None


def _parity_tensor(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    """Worst output of a component (lowest PSNR) against the reference's on the same inputs."""
    from diffship.parity.metrics import tensor_metrics

    worst = min((tensor_metrics(expected[k], actual[k]) for k in expected), key=lambda m: m.psnr)
    return {"psnr_db": finite_or_text(worst.psnr), "max_abs": worst.max_abs, "cosine": worst.cosine}


def _parity_image(expected: Any, actual: Any) -> dict[str, Any]:
    from diffship.parity.metrics import image_metrics

    m = image_metrics(expected, actual)
    return {"psnr_db": finite_or_text(m.psnr), "ssim": m.ssim, "max_abs": m.max_abs}


def _scheduler_summary(doc: dict[str, Any], images: dict[tuple, Any], reference: str | None) -> list[dict[str, Any]]:
    """Per scheduler: UNet calls per step, and the fewest measured steps whose image is within
    :data:`CONVERGED_PSNR` of the image at the most measured steps (reference subject)."""
    from diffship.parity.metrics import image_metrics

    st = doc["settings"]
    out = []
    for scheduler in st["schedulers"]:
        rows = [m for m in doc["measurements"] if m["kind"] == "pipeline" and m["subject"] == reference
                and m["scheduler"] == scheduler and m.get("latency_ms") and m["batch"] == st["batches"][0]
                and f"{m['height']}x{m['width']}" == st["sizes"][0]]
        if not rows:
            continue
        rows.sort(key=lambda m: m["steps"])
        final = images.get((reference, *_pkey(rows[-1])))
        psnr = {}
        for m in rows:
            image = images.get((reference, *_pkey(m)))
            if image is not None and final is not None:
                psnr[str(m["steps"])] = finite_or_text(image_metrics(final, image).psnr)
        needed = next((int(k) for k, v in psnr.items() if v == "inf" or v >= CONVERGED_PSNR), None)
        out.append({"scheduler": scheduler, "scheduler_class": rows[0].get("scheduler_class"), "subject": reference,
                    "unet_calls_per_step": round(rows[0]["unet_calls"] / rows[0]["steps"], 2),
                    "steps_needed": needed, "psnr_by_steps": psnr})
    return out


def _pkey(point: dict[str, Any]) -> tuple:
    return tuple(point[k] for k in ("batch", "height", "width", "steps", "scheduler"))


# --- the run ----------------------------------------------------------------------------------------------


def run_bench(settings: BenchSettings, out: str | Path, *, exports: str | Path | None = None, reuse_exports: bool = False,
              command: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Benchmark eager PyTorch and exports of one source; write results to ``out``.

    Args:
        settings: what to measure (see :class:`BenchSettings`; presets in ``configs/bench_presets.toml``).
        out: folder for results.json, results.csv, results.md, the plots and sample images.
        exports: where exports are written (default ``out/exports``).
        reuse_exports: keep an existing export of the same source, backend and precision (no export
            figures are recorded for it).
        command: the command line, recorded in the results.
        progress: receives phases and steps (for progress bars).

    Returns:
        The results document (also in ``out/results.json``); ``complete`` is True when every phase ran.
    """
    from diffship._registry import module_versions, modules_with
    from diffship.exporters.pipeline import backends as export_backends
    from diffship.manifest import library_versions

    settings.validate()
    progress = progress or Progress()
    out = Path(out)
    exports = Path(exports) if exports else out / "exports"
    planned = plan(settings)
    used = {p.subject.backend for p in planned} - {TORCH}
    versions = library_versions({k: v for name in used for k, v in export_backends()[name].versions().items()})
    versions.update(module_versions(*(pkg for m in modules_with("diffship.runtimes", "BACKENDS")
                                      if used & set(m.BACKENDS) for pkg in m.PACKAGES)))
    doc: dict[str, Any] = {
        "schema": SCHEMA, "complete": False, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": command, "settings": settings.to_dict(), "machine": machine_info(versions), "source": None,
        "reference": None, "subjects": [p.entry for p in planned], "measurements": [], "schedulers": [],
    }
    run = _Run(settings, out, doc, progress)
    run.save()
    try:
        from diffship.reference.loader import resolve_source

        progress.phase("preparing the source", 1)
        progress.advance(settings.source)
        resolve_source(settings.source)  # builds a preset on first use, so no export pays for it
        if settings.export_only:
            for p in planned:
                p.entry["not_run"] = p.entry["not_run"] or ("eager PyTorch has no export" if p.subject.backend == TORCH
                                                            else None)
        to_export = [p for p in planned if p.subject.backend != TORCH and not p.entry["not_run"]]
        progress.phase("exporting", len(to_export))
        for p in to_export:
            progress.advance(f"exporting {p.subject.name}")
            try:
                _export(p, settings, exports, reuse_exports)
            except DiffshipError as exc:
                p.entry["error"] = f"export failed: {first_line(exc)}"
                progress.note(f"{p.subject.name}: {p.entry['error']}")
            run.save()
        from diffship.runtimes import runtime_unavailable_reason

        for p in to_export:
            if settings.export_only:
                p.entry["not_run"] = "export only (--export-only)"
            elif not p.entry["error"] and (reason := runtime_unavailable_reason(p.subject.backend)):
                p.entry["not_run"] = reason
        runnable = [p for p in planned if not p.entry["not_run"] and not p.entry["error"]]
        groups = memory_groups(runnable, settings)
        if len(groups) > 1:
            progress.note(f"the subjects do not fit in memory together; measuring them in {len(groups)} groups, "
                          f"each with {groups[0][0].subject.name}")
        for i, group in enumerate(groups):
            run.measure(group, f" ({i + 1}/{len(groups)})" if len(groups) > 1 else "", first=i == 0)
        if not settings.export_only and not any(s["runs"] for s in doc["subjects"]):
            raise DiffshipError("no subject could be loaded; see the errors in " + str(out / "results.json"))
        doc["schedulers"] = _scheduler_summary(doc, run.images, doc["reference"])
        doc["complete"] = True
    finally:
        run.save(final=True)
    return doc


def _footprint(p: Planned, settings: BenchSettings) -> int:
    """Expected resident memory of a loaded subject: its weights (eager bf16 converts from fp32, so it
    peaks at the fp32 size; runtimes keep a copy plus work buffers) and the libraries."""
    from diffship.reference.loader import resolve_source

    if p.subject.backend == TORCH:
        weights = folder_bytes(resolve_source(settings.source)[0])
    else:
        weights = int(folder_bytes(Path(p.entry["folder"])) * 1.25)
    return weights + _WORKER_BASE


#: memory of a worker before its weights: interpreter, torch, diffusers and a runtime.
_WORKER_BASE = 700 * 2**20
#: share of the memory available when the run starts that its workers may use together.
_MEMORY_SHARE = 0.8


def memory_groups(runnable: list[Planned], settings: BenchSettings) -> list[list[Planned]]:
    """Subjects that fit in memory together, each group led by the reference (eager fp32) so every ratio
    comes from interleaved runs. Page-cache-backed weights (safetensors, OpenVINO) that do not fit are
    re-read from disk on every call, which would make a figure measure the disk."""
    from diffship.bench.machine import available_memory_bytes

    if not runnable:
        return []
    budget = int((available_memory_bytes() or 1 << 62) * _MEMORY_SHARE)
    lead, rest = runnable[0], runnable[1:]
    room = budget - _footprint(lead, settings)
    groups: list[list[Planned]] = [[lead]]
    used = 0
    for p in rest:
        need = _footprint(p, settings)
        if len(groups[-1]) > 1 and used + need > room:
            groups.append([lead])
            used = 0
        groups[-1].append(p)
        used += need
    return groups


class _Run:
    """One run's state: the results document, the reference's kept images, saving."""

    def __init__(self, settings: BenchSettings, out: Path, doc: dict[str, Any], progress: Progress):
        self.settings, self.out, self.doc, self.progress = settings, out, doc, progress
        self.images: dict[tuple, Any] = {}

    def save(self, final: bool = False) -> None:
        write_all(self.doc, self.out, final)

    def measure(self, group: list[Planned], label: str, first: bool) -> None:
        """Load one group of workers, measure every point, stop them. The group's lead (the reference)
        is measured again in later groups, for interleaving and parity; only its first figures are kept."""
        settings, doc, progress = self.settings, self.doc, self.progress
        self.workers: list[Worker] = []
        self.components: list[str] = []
        try:
            progress.phase(f"loading{label}", len(group))
            for p in group:
                progress.advance(f"loading {p.subject.name}")
                self._load(p, record=first or p is not group[0])
            if not self.workers:
                return
            lead = self.workers[0].planned.subject
            if first:
                # Parity is against eager fp32; without it (not requested, or it failed) none is measured.
                doc["reference"] = lead.name if (lead.backend, lead.precision) == (TORCH, "fp32") else None
            keep = {w.name for w in self.workers if first or w.name != group[0].subject.name}
            points = _component_points(settings, self.components)
            progress.phase(f"components{label}", len(points))
            for name, batch, height, width in points:
                progress.advance(f"{name} batch {batch} {height}x{width}")
                self._component(name, {"batch_size": batch, "height": height, "width": width, "guidance": True}, keep)
            pipeline_points = _pipeline_points(settings)
            progress.phase(f"end to end{label}", len(pipeline_points))
            for point in pipeline_points:
                progress.advance(f"{point['scheduler']} {point['steps']} steps, batch {point['batch']} "
                                 f"{point['height']}x{point['width']}")
                self._pipeline(point, keep)
        finally:
            for w in self.workers:
                memory = w.stop()
                entry = w.planned.entry
                if memory and (entry["memory"] is None or memory["peak_rss_bytes"] > entry["memory"]["peak_rss_bytes"]):
                    entry["memory"] = memory
            self.save()

    def _load(self, p: Planned, record: bool) -> None:
        worker_settings = {"source": self.settings.source, "device": self.settings.device,
                           "threads": self.settings.threads}
        worker = Worker(replace(p, subject=replace(p.subject, folder=p.entry["folder"])), worker_settings)
        status, value = worker.reply()
        if status != "ok":
            p.entry["error"] = value
            self.progress.note(f"{p.subject.name}: {value}")
            worker.stop()
            return
        if record:
            p.entry["runs"] = True
            p.entry["runtime"] = value["runtime"]
            p.entry["load"] = {"seconds": value["load_seconds"], "rss_bytes": value["rss_bytes"]}
            if p.subject.backend == TORCH:
                p.entry["size_bytes"] = folder_bytes(Path(value["source"]["path"]))
        self.doc["source"] = self.doc["source"] or value["source"]
        self.components = self.components or value["components"]
        self.workers.append(worker)
        self.save()

    def _dead(self, w: Worker, why: str) -> None:
        w.planned.entry["error"] = why
        self.workers.remove(w)
        self.progress.note(f"{w.name}: {why}")

    def _component(self, name: str, profile: dict[str, Any], keep: set[str]) -> None:
        settings, doc = self.settings, self.doc
        series = _series(list(self.workers), lambda k: ("component", name, profile, 1, k), settings.warmup,
                         settings.repeats, self._dead)
        flops = _flops(self.workers[0], name, profile) if doc["reference"] and self.workers else None
        ref = series.get(doc["reference"] or "", {}).get("kept")
        for subject, s in series.items():
            if subject not in keep:
                continue
            m = {"kind": "component", "subject": subject, "component": name, "batch": profile["batch_size"],
                 "height": profile["height"], "width": profile["width"], "steps": None, "scheduler": None,
                 "skipped": s["skipped"] if not s["seconds"] else None, "latency_ms": stats_ms(s["seconds"]),
                 "first_call_ms": s["first"] and s["first"] * 1e3, "flops": flops, "gflops_per_s": None, "parity": None}
            if flops and m["latency_ms"]:
                m["gflops_per_s"] = flops / 1e9 / (m["latency_ms"]["median"] / 1e3)
            if ref and s["kept"] and subject != doc["reference"]:
                m["parity"] = _parity_tensor(ref["outputs"], s["kept"]["outputs"])
            doc["measurements"].append(m)
        self.save()

    def _pipeline(self, point: dict[str, Any], keep: set[str]) -> None:
        settings, doc = self.settings, self.doc
        request = {**point, "prompt": settings.prompt, "seed": settings.seed, "guidance_scale": settings.guidance_scale}
        series = _series(list(self.workers), lambda k: ("pipeline", request, k), 0, settings.e2e_repeats, self._dead)
        ref = series.get(doc["reference"] or "", {}).get("kept")
        for subject, s in series.items():
            if subject not in keep:
                continue
            kept = s["kept"] or {}
            m = {"kind": "pipeline", "subject": subject, "component": None, **point,
                 "skipped": s["skipped"] if not s["seconds"] else None, "latency_ms": stats_ms(s["seconds"]),
                 "scheduler_class": kept.get("scheduler_class"), "step_ms": stats_ms(kept.get("step_seconds", [])),
                 "unet_calls": kept.get("unet_calls"), "steps_per_s": None, "parity": None}
            if m["latency_ms"]:
                m["steps_per_s"] = point["steps"] / (m["latency_ms"]["median"] / 1e3)
            if kept.get("image") is not None:
                self.images[(subject, *_pkey(point))] = kept["image"]
                _save_image(self.out, subject, point, kept["image"])
                if ref and subject != doc["reference"]:
                    m["parity"] = _parity_image(ref["image"], kept["image"])
            doc["measurements"].append(m)
        self.save()


def _save_image(out: Path, subject: str, point: dict[str, Any], image: Any) -> None:
    import numpy as np
    from PIL import Image

    from diffship._files import atomic_write, png_bytes

    name = f"{point['scheduler']}-{point['steps']}steps-b{point['batch']}-{point['height']}x{point['width']}.png"
    pixels = (np.clip(image, 0, 1) * 255).round().astype("uint8")
    atomic_write(out / "images" / subject / name, png_bytes(Image.fromarray(pixels)))

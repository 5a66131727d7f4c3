"""Benchmark results: the JSON document (schema ``diffship.bench/1``), its CSV and Markdown forms.

The JSON Schema is ``diffship/bench/schema.json``; in short::

    schema: "diffship.bench/1"
    complete: false while running or after an interruption (what finished is kept)
    created: ISO time; command: the command line that produced it
    settings: the BenchSettings (sizes as "HxW")
    machine: cpu, architecture, logical/physical/usable cores, isa flags, memory_bytes, os, python,
             torch_threads, gpu, versions {library: version}
    source: {name, kind, path, pipeline_class, fingerprint} of what was benchmarked
    reference: the subject parity is measured against ("torch-fp32"), or null
    subjects: one per eager precision / backend x precision:
        name, backend, precision, folder, runs (measured here), not_run / error (why not),
        runtime (what computed it: "PyTorch ... eager", "onnxruntime ...", "MIL reference (Linux)"),
        export: {seconds, peak_rss_bytes, child_peak_rss_bytes, size_bytes} or null (eager, reused),
        load: {seconds, rss_bytes}, size_bytes (weights on disk),
        memory: {peak_rss_bytes, rss_bytes, peak_gpu_bytes} at the end of the run
    measurements: one per subject x point:
        kind "component": component, batch (images per call; the UNet runs 2x with guidance),
            height, width, latency_ms, first_call_ms, flops and gflops_per_s (UNet),
            parity {psnr_db, max_abs, cosine} of the outputs vs the reference on the same inputs
        kind "pipeline": batch, height, width, steps, scheduler (as requested; "default" is the
            pipeline's own), scheduler_class, latency_ms (whole call),
            step_ms (per denoising-loop iteration), unet_calls, steps_per_s,
            parity {psnr_db, ssim, max_abs} of the first image vs the reference's
        either: skipped (why the subject could not take this point) instead of figures
    schedulers: per scheduler: scheduler_class, unet_calls_per_step, and steps_needed -- the fewest measured steps
        whose image is within 30 dB PSNR of the same scheduler's image at the most measured steps
        (on the reference subject)

latency_ms / step_ms: {median, p10, p90, mean, min, n}. Infinite PSNR (identical) is the string "inf".
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from diffship._files import atomic_write

SCHEMA = "diffship.bench/1"
SCHEMA_FILE = Path(__file__).with_name("schema.json")
#: PSNR (dB) at which an image counts as converged to the same scheduler's most-steps image.
CONVERGED_PSNR = 30.0
#: identity of a measurement across runs (``bench compare`` matches on it).
KEY_FIELDS = ("kind", "subject", "component", "batch", "height", "width", "steps", "scheduler")

CSV_FIELDS = (
    "kind", "subject", "backend", "precision", "component", "batch", "height", "width", "steps", "scheduler",
    "median_ms", "p10_ms", "p90_ms", "mean_ms", "n", "first_call_ms", "step_median_ms", "steps_per_s",
    "unet_calls", "flops", "gflops_per_s", "psnr_db", "ssim", "max_abs", "seconds", "peak_rss_bytes",
    "child_peak_rss_bytes", "size_bytes", "skipped",
)


def stats_ms(seconds: Iterable[float]) -> dict[str, float | int] | None:
    """Median, p10, p90, mean and min of timings, in milliseconds."""
    values = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if values.size == 0:
        return None
    return {"median": float(np.median(values)), "p10": float(np.percentile(values, 10)),
            "p90": float(np.percentile(values, 90)), "mean": float(values.mean()), "min": float(values.min()),
            "n": int(values.size)}


def finite_or_text(value: float) -> float | str:
    """JSON has no infinity: identical outputs (PSNR inf) are stored as ``"inf"``."""
    return value if math.isfinite(value) else str(value)


def key(measurement: dict[str, Any]) -> tuple:
    return tuple(measurement.get(f) for f in KEY_FIELDS)


def write_json_atomic(doc: dict[str, Any], path: Path) -> Path:
    return atomic_write(path, json.dumps(doc, indent=2) + "\n")


def read_results(path: Path) -> dict[str, Any]:
    """A results file, checked to be a diffship benchmark of this schema."""
    from diffship.errors import ConfigError

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read benchmark results ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ConfigError(f"{path}: not a diffship benchmark result (schema {SCHEMA}); "
                          f"found {doc.get('schema') if isinstance(doc, dict) else type(doc).__name__!r}")
    return doc


def csv_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per export, load and measurement, columns :data:`CSV_FIELDS`."""
    subjects = {s["name"]: s for s in doc["subjects"]}
    rows = []
    for s in doc["subjects"]:
        base = {"subject": s["name"], "backend": s["backend"], "precision": s["precision"]}
        if s.get("export"):
            rows.append({**base, "kind": "export", **s["export"]})
        if s.get("load"):
            rows.append({**base, "kind": "load", "seconds": s["load"]["seconds"],
                         "peak_rss_bytes": (s.get("memory") or {}).get("peak_rss_bytes"),
                         "size_bytes": s.get("size_bytes")})
    for m in doc["measurements"]:
        s = subjects[m["subject"]]
        lat = m.get("latency_ms") or {}
        row = {"backend": s["backend"], "precision": s["precision"], **{f: m.get(f) for f in KEY_FIELDS},
               **{f"{k}_ms": lat.get(k) for k in ("median", "p10", "p90", "mean")}, "n": lat.get("n"),
               "first_call_ms": m.get("first_call_ms"), "steps_per_s": m.get("steps_per_s"),
               "step_median_ms": (m.get("step_ms") or {}).get("median"), "unet_calls": m.get("unet_calls"),
               "flops": m.get("flops"), "gflops_per_s": m.get("gflops_per_s"), "skipped": m.get("skipped")}
        row.update({k: (m.get("parity") or {}).get(k) for k in ("psnr_db", "ssim", "max_abs")})
        rows.append(row)
    return rows


def to_csv(doc: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(doc):
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


# --- Markdown --------------------------------------------------------------------------------------------


def _gb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e9:.2f} GB"


def _ms(stats: dict[str, Any] | None) -> str:
    if not stats:
        return ""
    return f"{stats['median']:.1f} ({stats['p10']:.1f}-{stats['p90']:.1f})" if stats["n"] > 1 else f"{stats['median']:.1f}"


def _psnr(parity: dict[str, Any] | None) -> str:
    if not parity:
        return ""
    value = parity["psnr_db"]
    return "identical" if value == "inf" else f"{value:.1f} dB"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def find(doc: dict[str, Any], **where: Any) -> list[dict[str, Any]]:
    """Measurements whose fields equal ``where``."""
    return [m for m in doc["measurements"] if all(m.get(k) == v for k, v in where.items())]


def default_point(doc: dict[str, Any]) -> dict[str, Any]:
    """The default request: first size, first batch, first step count, first scheduler."""
    st = doc["settings"]
    height, width = (int(v) for v in st["sizes"][0].split("x"))
    return {"batch": st["batches"][0], "height": height, "width": width, "steps": st["steps"][0],
            "scheduler": st["schedulers"][0]}


def summary_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per subject at the default request: export, memory, UNet and end-to-end speed, parity."""
    p = default_point(doc)
    rows = []
    for s in doc["subjects"]:
        unet = next(iter(find(doc, kind="component", subject=s["name"], component="unet", batch=p["batch"],
                              height=p["height"], width=p["width"])), {})
        e2e = next(iter(find(doc, kind="pipeline", subject=s["name"], **p)), {})
        export = s.get("export") or {}
        status = s.get("error") or s.get("not_run")
        rows.append([
            s["name"], f"{export['seconds']:.1f} s" if export.get("seconds") is not None else "",
            _gb(max(export.get("peak_rss_bytes") or 0, export.get("child_peak_rss_bytes") or 0) or None),
            _gb(s.get("size_bytes")), f"{s['load']['seconds']:.1f} s" if s.get("load") else "",
            _gb((s.get("memory") or {}).get("peak_rss_bytes")),
            _ms(unet.get("latency_ms")), f"{unet['gflops_per_s']:.0f}" if unet.get("gflops_per_s") else "",
            f"{e2e['latency_ms']['median'] / 1e3:.2f} s" if e2e.get("latency_ms") else "",
            f"{e2e['steps_per_s']:.2f}" if e2e.get("steps_per_s") else "",
            _psnr(e2e.get("parity")) or ("reference" if s["name"] == doc.get("reference") else ""),
            f"not run: {status}" if status else s.get("runtime") or "",
        ])
    header = ["subject", "export", "export peak RSS", "size on disk", "load", "peak RSS",
              f"UNet ms (batch {2 * p['batch']})", "GFLOP/s", f"{p['steps']} steps", "steps/s", "image PSNR", "runs on"]
    return header, rows


def to_markdown(doc: dict[str, Any]) -> str:
    """The run as Markdown: a summary per subject, then every sweep."""
    p = default_point(doc)
    mc = doc["machine"]
    cores = f"{mc.get('physical_cores') or '?'} physical / {mc.get('usable_cores')} usable cores"
    lines = [
        f"# diffship bench: {doc['source']['name'] if doc.get('source') else doc['settings']['source']}",
        "",
        f"- machine: {mc['cpu']} ({mc['architecture']}), {cores}, {_gb(mc.get('memory_bytes'))} RAM"
        + (f", GPU {mc['gpu']}" if mc.get("gpu") else ", no GPU"),
        f"- isa: {' '.join(mc.get('isa', [])) or 'unknown'}",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in mc.get('versions', {}).items())}",
        f"- command: `{doc.get('command') or 'diffship bench'}`; {doc['created']}"
        + ("" if doc["complete"] else " -- **incomplete run** (interrupted or failed)"),
        f"- default request: {p['height']}x{p['width']}, batch {p['batch']}, {p['steps']} steps, scheduler "
        f"{p['scheduler']}, guidance {doc['settings']['guidance_scale']}; parity against {doc.get('reference') or 'nothing'}",
        "",
        "## Summary",
        "",
    ]
    header, rows = summary_rows(doc)
    lines += [_table(header, rows), ""]
    lines += ["Latencies are medians (p10-p90) of interleaved runs. Peak RSS is each subject's own process; "
              "export peak RSS is the larger of the export process and its helper processes. Image PSNR "
              "compares the first image with the reference subject's at the same seed.", ""]
    lines += ["## Components", ""]
    rows = [[m["subject"], m["component"], m["batch"], f"{m['height']}x{m['width']}",
             m.get("skipped") and f"skipped: {m['skipped']}" or _ms(m.get("latency_ms")),
             f"{m['first_call_ms']:.0f}" if m.get("first_call_ms") is not None else "",
             f"{m['flops'] / 1e9:.0f}" if m.get("flops") else "",
             f"{m['gflops_per_s']:.0f}" if m.get("gflops_per_s") else "", _psnr(m.get("parity"))]
            for m in doc["measurements"] if m["kind"] == "component"]
    lines += [_table(["subject", "component", "batch", "size", "ms median (p10-p90)", "first call ms",
                      "GFLOP", "GFLOP/s", "output PSNR"], rows), ""]
    lines += ["## End to end", ""]
    rows = [[m["subject"], m["scheduler"], m["steps"], m["batch"], f"{m['height']}x{m['width']}",
             m.get("skipped") and f"skipped: {m['skipped']}" or _ms(m.get("latency_ms")),
             _ms(m.get("step_ms")), f"{m['steps_per_s']:.2f}" if m.get("steps_per_s") else "",
             _psnr(m.get("parity")), f"{m['parity']['ssim']:.4f}" if m.get("parity") else ""]
            for m in doc["measurements"] if m["kind"] == "pipeline"]
    lines += [_table(["subject", "scheduler", "steps", "batch", "size", "ms median (p10-p90)",
                      "ms per iteration", "steps/s", "image PSNR", "SSIM"], rows), ""]
    if doc.get("schedulers"):
        lines += ["## Schedulers", "",
                  f"steps needed: the fewest measured step counts whose image is within {CONVERGED_PSNR:.0f} dB "
                  "of the same scheduler's image at the most measured steps (reference subject).", ""]
        lines += [_table(["scheduler", "UNet calls per step", "steps needed", "PSNR by steps"],
                         [[s["scheduler_class"] or s["scheduler"], s["unet_calls_per_step"], s["steps_needed"] or "not within the measured counts",
                           ", ".join(f"{k}: {v if isinstance(v, str) else f'{v:.1f}'}" for k, v in s["psnr_by_steps"].items())]
                          for s in doc["schedulers"]]), ""]
    return "\n".join(lines)


def write_all(doc: dict[str, Any], out: Path, final: bool) -> list[Path]:
    """Write results.json and results.csv (after every measurement); Markdown and plots when ``final``."""
    out = Path(out)
    paths = [write_json_atomic(doc, out / "results.json"), atomic_write(out / "results.csv", to_csv(doc))]
    if final:
        paths.append(atomic_write(out / "results.md", to_markdown(doc)))
        from diffship.bench.plots import write_plots

        paths += write_plots(doc, out)
    return paths

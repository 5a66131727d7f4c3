"""Benchmark results written out: the JSON document, its CSV and Markdown forms, and the plots.

The records and their schema are :mod:`diffship.bench.records`; this module only renders them.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from diffship._files import atomic_write
from diffship.configs.fields import to_data
from diffship.bench.analysis import CONVERGED_PSNR
from diffship.bench.records import (KEY_FIELDS, BenchResults, ComponentMeasurement, ImageParity, PipelineMeasurement,
                                    Stats, TensorParity)

CSV_FIELDS = (
    "kind", "subject", "backend", "precision", "component", "batch", "height", "width", "steps", "scheduler",
    "median_ms", "p10_ms", "p90_ms", "mean_ms", "n", "first_call_ms", "step_median_ms", "steps_per_s",
    "unet_calls", "flops", "gflops_per_s", "psnr_db", "ssim", "max_abs", "seconds", "peak_rss_bytes",
    "child_peak_rss_bytes", "size_bytes", "skipped", "component_ms",
)


def write_json_atomic(doc: BenchResults, path: Path) -> Path:
    return atomic_write(path, json.dumps(doc.to_data(), indent=2) + "\n")


def csv_rows(doc: BenchResults) -> list[dict[str, Any]]:
    """One row per export, load and measurement, columns :data:`CSV_FIELDS`."""
    subjects = {s.name: s for s in doc.subjects}
    rows = []
    for s in doc.subjects:
        base = {"subject": s.name, "backend": s.backend, "precision": s.precision}
        if s.export:
            rows.append({**base, "kind": "export", **to_data(s.export)})
        if s.load:
            rows.append({**base, "kind": "load", "seconds": s.load.seconds,
                         "peak_rss_bytes": s.memory.peak_rss_bytes if s.memory else None, "size_bytes": s.size_bytes})
    for m in doc.measurements:
        s = subjects[m.subject]
        lat = to_data(m.latency_ms) or {}
        parity = to_data(m.parity) or {}
        component = isinstance(m, ComponentMeasurement)
        row = {"backend": s.backend, "precision": s.precision, **{f: getattr(m, f) for f in KEY_FIELDS},
               **{f"{k}_ms": lat.get(k) for k in ("median", "p10", "p90", "mean")}, "n": lat.get("n"),
               "skipped": m.skipped, **{k: parity.get(k) for k in ("psnr_db", "ssim", "max_abs")}}
        if component:
            row.update(first_call_ms=m.first_call_ms, flops=m.flops, gflops_per_s=m.gflops_per_s)
        else:
            row.update(steps_per_s=m.steps_per_s, step_median_ms=m.step_ms.median if m.step_ms else None,
                       unet_calls=m.unet_calls, component_ms=json.dumps(m.component_ms) if m.component_ms else None)
        rows.append(row)
    return rows


def to_csv(doc: BenchResults) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(doc):
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


# --- Markdown --------------------------------------------------------------------------------------------


def _gb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e9:.2f} GB"


def _ms(stats: Stats | None) -> str:
    if not stats:
        return ""
    return f"{stats.median:.1f} ({stats.p10:.1f}-{stats.p90:.1f})" if stats.n > 1 else f"{stats.median:.1f}"


def _psnr(parity: TensorParity | ImageParity | None) -> str:
    if not parity:
        return ""
    return "identical" if parity.psnr_db == "inf" else f"{float(parity.psnr_db):.1f} dB"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(doc: BenchResults) -> tuple[list[str], list[list[str]]]:
    """One row per subject at the default request: export, memory, denoiser and end-to-end speed, parity."""
    p = doc.default_point()
    denoiser, label = doc.denoiser()
    peaks = doc.machine.get("matmul_peak_gflops", {})
    rows = []
    for s in doc.subjects:
        unet = next(iter(doc.find(kind="component", subject=s.name, component=denoiser, batch=p["batch"],
                                  height=p["height"], width=p["width"])), None)
        e2e = next(iter(doc.find(kind="pipeline", subject=s.name, **p)), None)
        export = s.export
        status = s.error or s.not_run
        rows.append([
            f"{s.name} ({s.origin or s.tuned})" if s.origin or s.tuned else s.name,
            f"{export.seconds:.1f} s" if export else "",
            _gb(max(export.peak_rss_bytes, export.child_peak_rss_bytes) or None) if export else "",
            _gb(s.size_bytes), f"{s.load.seconds:.1f} s" if s.load else "",
            _gb(s.memory.peak_rss_bytes if s.memory else None),
            _ms(unet.latency_ms) if unet else "", _rate(unet.gflops_per_s if unet else None, peaks, s.compute),
            f"{e2e.latency_ms.median / 1e3:.2f} s" if e2e and e2e.latency_ms else "",
            f"{e2e.steps_per_s:.2f}" if e2e and e2e.steps_per_s else "",
            (_psnr(e2e.parity) if e2e else "") or ("reference" if s.name == doc.reference else ""),
            f"not run: {status}" if status else s.runtime or "",
        ])
    header = ["subject", "export", "export peak RSS", "size on disk", "load", "peak RSS",
              f"{label} ms (batch {2 * p['batch']})", "GFLOP/s", f"{p['steps']} steps", "steps/s", "image PSNR", "runs on"]
    return header, rows


def _split(m: PipelineMeasurement) -> str:
    """The run's time by component, then the rest (the pipeline's own work: scheduler, pre/post-processing)."""
    if not m.component_ms or not m.latency_ms:
        return ""
    rest = m.latency_ms.median - sum(m.component_ms.values())
    return ", ".join([f"{k} {v:.0f}" for k, v in m.component_ms.items()] + [f"rest {rest:.0f}"])


def _rate(gflops: float | None, peaks: dict[str, float], compute: str | None) -> str:
    """Achieved GFLOP/s, with its share of the measured matmul peak of what the subject computes in (the
    fp32 peak where that one was not measured), where there is one."""
    if not gflops:
        return ""
    dtype = compute if compute in peaks else "fp32"
    peak = peaks.get(dtype)
    return f"{gflops:.0f} ({100 * gflops / peak:.0f}% of {dtype} peak)" if peak else f"{gflops:.0f}"


def to_markdown(doc: BenchResults) -> str:
    """The run as Markdown: a summary per subject, then every sweep."""
    p = doc.default_point()
    mc = doc.machine
    cores = f"{mc.get('physical_cores') or '?'} physical / {mc.get('usable_cores')} usable cores"
    lines = [
        f"# diffship bench: {doc.source['name'] if doc.source else doc.settings['source']}",
        "",
        f"- machine: {mc['cpu']} ({mc['architecture']}), {cores}, {_gb(mc.get('memory_bytes'))} RAM"
        + (f", GPU {mc['gpu']}" if mc.get("gpu") else ", no GPU"),
        f"- isa: {' '.join(mc.get('isa', [])) or 'unknown'}",
        "- measured matmul peak (eager PyTorch, 2048^3): "
        + (", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in mc.get("matmul_peak_gflops", {}).items()) or "not measured"),
        f"- libraries: {', '.join(f'{k} {v}' for k, v in mc.get('versions', {}).items())}",
        f"- command: `{doc.command or 'diffship bench'}`; {doc.created}"
        + ("" if doc.complete else " -- **incomplete run** (interrupted or failed)"),
        f"- default request: {p['height']}x{p['width']}, batch {p['batch']}, {p['steps']} steps, scheduler "
        f"{p['scheduler']}, guidance {doc.settings['guidance_scale']}; parity against {doc.reference or 'nothing'}",
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
    rows = [[m.subject, m.component, m.batch, f"{m.height}x{m.width}",
             m.skipped and f"skipped: {m.skipped}" or _ms(m.latency_ms),
             f"{m.first_call_ms:.0f}" if m.first_call_ms is not None else "",
             f"{m.flops / 1e9:.0f}" if m.flops else "",
             f"{m.gflops_per_s:.0f}" if m.gflops_per_s else "", _psnr(m.parity)]
            for m in doc.find(kind="component")]
    lines += [_table(["subject", "component", "batch", "size", "ms median (p10-p90)", "first call ms",
                      "GFLOP", "GFLOP/s", "output PSNR"], rows), ""]
    lines += ["## End to end", ""]
    rows = [[m.subject, m.scheduler, m.steps, m.batch, f"{m.height}x{m.width}",
             m.skipped and f"skipped: {m.skipped}" or _ms(m.latency_ms),
             _ms(m.step_ms), f"{m.steps_per_s:.2f}" if m.steps_per_s else "",
             _split(m), _psnr(m.parity), f"{m.parity.ssim:.4f}" if m.parity else ""]
            for m in doc.find(kind="pipeline")]
    lines += [_table(["subject", "scheduler", "steps", "batch", "size", "ms median (p10-p90)",
                      "ms per iteration", "steps/s", "time split (ms)", "image PSNR", "SSIM"], rows), ""]
    if doc.schedulers:
        lines += ["## Schedulers", "",
                  f"steps needed: the fewest measured step counts whose image is within {CONVERGED_PSNR:.0f} dB "
                  "of the same scheduler's image at the most measured steps (reference subject).", ""]
        lines += [_table(["scheduler", f"{doc.denoiser()[1]} calls per step", "steps needed", "PSNR by steps"],
                         [[s.scheduler_class or s.scheduler, s.unet_calls_per_step,
                           s.steps_needed or "not within the measured counts",
                           ", ".join(f"{k}: {v if isinstance(v, str) else f'{v:.1f}'}" for k, v in s.psnr_by_steps.items())]
                          for s in doc.schedulers]), ""]
    return "\n".join(lines)


def write_all(doc: BenchResults, out: Path, final: bool) -> list[Path]:
    """Write results.json and results.csv (after every measurement); Markdown and plots when ``final``."""
    from diffship.bench.plots import write_plots

    out = Path(out)
    paths = [write_json_atomic(doc, out / "results.json"), atomic_write(out / "results.csv", to_csv(doc))]
    if final:
        paths.append(atomic_write(out / "results.md", to_markdown(doc)))
        paths += write_plots(doc, out)
    return paths

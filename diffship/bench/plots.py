"""PNG plots of a benchmark run: latency by subject, and resolution scaling (matplotlib, extra ``bench``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffship.bench.records import BenchResults

log = logging.getLogger("diffship")


def write_plots(doc: BenchResults, out: Path) -> list[Path]:
    """``latency_by_backend.png`` and ``resolution_scaling.png``; none (with a warning naming the
    extra) when matplotlib is missing, so a finished run still writes its other files."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plots skipped: they need matplotlib; install it with: pip install 'diffship[bench]'")
        return []
    paths = []
    for name, draw in (("latency_by_backend.png", _latency), ("resolution_scaling.png", _scaling)):
        fig = draw(doc, plt)
        if fig is None:
            continue
        path = Path(out) / name
        tmp = path.with_name(f".{name}.tmp.png")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def _latency(doc: BenchResults, plt: Any):
    """Median denoiser call and end-to-end latency per subject at the default request, with p10-p90 bars."""
    p = doc.default_point()
    denoiser, label = doc.denoiser()
    panels = [
        (f"{label} call, batch {2 * p['batch']}, {p['height']}x{p['width']} (ms)",
         {"kind": "component", "component": denoiser, "batch": p["batch"], "height": p["height"], "width": p["width"]}),
        (f"end to end, {p['steps']} steps (ms)", {"kind": "pipeline", **p}),
    ]
    data = [[(m.subject, m.latency_ms) for m in doc.find(**where) if m.latency_ms] for _, where in panels]
    if not any(data):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 + 0.45 * max(len(d) for d in data)))
    for ax, (title, _), rows in zip(axes, panels, data):
        names = [r[0] for r in rows]
        med = [r[1].median for r in rows]
        err = [[r[1].median - r[1].p10 for r in rows], [r[1].p90 - r[1].median for r in rows]]
        ax.barh(names, med, xerr=err, color="#4c72b0")
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        for y, v in enumerate(med):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    fig.suptitle(f"{doc.settings['source']} on {doc.machine['cpu']}", fontsize=10)
    return fig


def _scaling(doc: BenchResults, plt: Any):
    """Median denoiser latency against image pixels, one line per subject (batch 1 requests)."""
    batch = doc.settings["batches"][0]
    denoiser, label = doc.denoiser()
    lines: dict[str, list[tuple[int, float]]] = {}
    for m in doc.find(kind="component", component=denoiser, batch=batch):
        if m.latency_ms:
            lines.setdefault(m.subject, []).append((m.height * m.width, m.latency_ms.median))
    lines = {k: sorted(v) for k, v in lines.items() if len(v) > 1}
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for subject, points in lines.items():
        ax.plot([x / 1e6 for x, _ in points], [y for _, y in points], marker="o", label=subject)
    ax.set_xlabel("image megapixels")
    ax.set_ylabel(f"{label} call, batch {2 * batch}: median ms")
    ax.set_title(f"resolution scaling: {doc.settings['source']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig

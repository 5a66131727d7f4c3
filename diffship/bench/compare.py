"""``diffship bench compare A.json B.json``: what got slower, bigger or less exact from A to B.

Measurements are matched by :data:`~diffship.bench.records.KEY_FIELDS` (kind, subject, component,
shape, steps, scheduler); subjects by name for export and memory figures. A regression is a median
latency, export time or peak memory more than ``threshold`` above A's, or an image/output PSNR more
than ``psnr_drop`` dB below A's (any drop to a non-finite value counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffship.bench.records import BenchResults, Measurement, key, psnr_value

#: PSNR beyond this (dB) is float rounding noise: 130 dB and identical compare as equal.
PSNR_CAP = 100.0


@dataclass(frozen=True)
class Change:
    """One figure present in both runs.

    Attributes:
        what: the measurement or subject it belongs to, in words.
        metric: ``median_ms``, ``export_s``, ``peak_rss_bytes`` or ``psnr_db``.
        before / after: the values in A and B.
        ratio: after / before (PSNR: the difference in dB).
        regression: beyond the threshold in the bad direction.
    """

    what: str
    metric: str
    before: float
    after: float
    ratio: float
    regression: bool


def _describe(m: Measurement) -> str:
    parts = [m.subject, m.component or "pipeline", f"b{m.batch}", f"{m.height}x{m.width}"]
    if m.kind == "pipeline":
        parts += [f"{m.steps} steps", m.scheduler]
    return " ".join(str(p) for p in parts)


def _median(m: Measurement) -> float | None:
    return m.latency_ms.median if m.latency_ms else None


def _psnr(m: Measurement) -> float | None:
    return psnr_value(m.parity.psnr_db) if m.parity else None


def compare(a: BenchResults, b: BenchResults, threshold: float = 0.10, psnr_drop: float = 1.0) -> list[Change]:
    """Every figure of A that B also has, judged against the thresholds."""
    changes = []

    def slower(what: str, metric: str, before: float | None, after: float | None) -> None:
        if before and after is not None:
            changes.append(Change(what, metric, before, after, after / before, after > before * (1 + threshold)))

    after_by_key = {key(m): m for m in b.measurements}
    for m in a.measurements:
        other = after_by_key.get(key(m))
        if other is None:
            continue
        what = _describe(m)
        slower(what, "median_ms", _median(m), _median(other))
        before, after = _psnr(m), _psnr(other)
        if before is not None and after is not None:
            drop = min(before, PSNR_CAP) - min(after, PSNR_CAP)
            changes.append(Change(what, "psnr_db", before, after, -drop, math.isnan(after) or drop > psnr_drop))
    subjects_b = {s.name: s for s in b.subjects}
    for s in a.subjects:
        other = subjects_b.get(s.name)
        if other is None:
            continue
        if s.export and other.export:
            slower(s.name, "export_s", s.export.seconds, other.export.seconds)
            slower(s.name, "export_peak_rss_bytes", s.export.peak_rss_bytes, other.export.peak_rss_bytes)
        if s.memory and other.memory:
            slower(s.name, "peak_rss_bytes", s.memory.peak_rss_bytes, other.memory.peak_rss_bytes)
    return changes


def machine_differences(a: BenchResults, b: BenchResults) -> list[str]:
    """Machine facts that differ between two runs (their figures are then not comparable)."""
    out = []
    for field in ("cpu", "logical_cores", "usable_cores", "gpu"):
        if a.machine.get(field) != b.machine.get(field):
            out.append(f"{field}: {a.machine.get(field)} -> {b.machine.get(field)}")
    return out

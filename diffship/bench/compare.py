"""``diffship bench compare A.json B.json``: what got slower, bigger or less exact from A to B.

Measurements are matched by :data:`~diffship.bench.results.KEY_FIELDS` (kind, subject, component,
shape, steps, scheduler); subjects by name for export and memory figures. A regression is a median
latency, export time or peak memory more than ``threshold`` above A's, or an image/output PSNR more
than ``psnr_drop`` dB below A's (any drop to a non-finite value counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from diffship.bench.results import key

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


def _describe(m: dict[str, Any]) -> str:
    parts = [m["subject"], m.get("component") or "pipeline", f"b{m['batch']}", f"{m['height']}x{m['width']}"]
    if m["kind"] == "pipeline":
        parts += [f"{m['steps']} steps", m["scheduler"]]
    return " ".join(str(p) for p in parts)


def _psnr(value: Any) -> float | None:
    if value is None:
        return None
    return math.inf if value == "inf" else float(value)


def compare(a: dict[str, Any], b: dict[str, Any], threshold: float = 0.10, psnr_drop: float = 1.0) -> list[Change]:
    """Every figure of A that B also has, judged against the thresholds."""
    changes = []

    def slower(what: str, metric: str, before: float | None, after: float | None) -> None:
        if before and after is not None:
            changes.append(Change(what, metric, before, after, after / before, after > before * (1 + threshold)))

    after_by_key = {key(m): m for m in b["measurements"]}
    for m in a["measurements"]:
        other = after_by_key.get(key(m))
        if other is None:
            continue
        what = _describe(m)
        slower(what, "median_ms", (m.get("latency_ms") or {}).get("median"), (other.get("latency_ms") or {}).get("median"))
        before, after = _psnr((m.get("parity") or {}).get("psnr_db")), _psnr((other.get("parity") or {}).get("psnr_db"))
        if before is not None and after is not None:
            drop = min(before, PSNR_CAP) - min(after, PSNR_CAP)
            changes.append(Change(what, "psnr_db", before, after, -drop, math.isnan(after) or drop > psnr_drop))
    subjects_b = {s["name"]: s for s in b["subjects"]}
    for s in a["subjects"]:
        other = subjects_b.get(s["name"])
        if other is None:
            continue
        slower(s["name"], "export_s", (s.get("export") or {}).get("seconds"), (other.get("export") or {}).get("seconds"))
        slower(s["name"], "export_peak_rss_bytes", (s.get("export") or {}).get("peak_rss_bytes"),
               (other.get("export") or {}).get("peak_rss_bytes"))
        slower(s["name"], "peak_rss_bytes", (s.get("memory") or {}).get("peak_rss_bytes"),
               (other.get("memory") or {}).get("peak_rss_bytes"))
    return changes


def machine_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Machine facts that differ between two runs (their figures are then not comparable)."""
    out = []
    for field in ("cpu", "logical_cores", "usable_cores", "gpu"):
        if a["machine"].get(field) != b["machine"].get(field):
            out.append(f"{field}: {a['machine'].get(field)} -> {b['machine'].get(field)}")
    return out

"""Writers for :class:`~diffship.parity.result.ParityReport`: JSON, Markdown, JUnit XML and HTML.

:func:`write_report` writes the usual set into one folder::

    report.json            the diffship.parity/1 document (see diffship.parity.result)
    report.md              a summary for people and CI job pages
    index.html             a self-contained page (inline CSS, relative links only)
    images/<task>-<index>-eager.png, -exported.png, -diff.png

:func:`write_junit` is separate, since CI systems want it at a path of their own. Every file is
written atomically (a temporary sibling, then ``os.replace``), so a reader or an interrupted run never
sees a half-written file; that guards against interruptions, not power loss (no fsync).
"""

from __future__ import annotations

import html
import json
import math
import re
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffship.backends.base import describe_settings
from diffship._files import atomic_write, png_bytes
from diffship.parity.metrics import IMAGE_LIMITS, MAX, TENSOR_LIMITS, as_image, format_pair, within_limit
from diffship.parity.result import ComponentResult, ImageResult, ParityReport

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
INDEX_HTML = "index.html"
IMAGES_DIR = "images"

#: Heat-map colour stops from black (no difference) to pale yellow (the largest), inferno-like.
HEATMAP_STOPS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)

# A table cell: its text, and whether it shows something outside tolerance.
Cell = tuple[str, bool]


def write_json(report: ParityReport, path: Path) -> Path:
    """Write the ``diffship.parity/1`` JSON document to ``path``; returns ``path``."""
    # allow_nan=False: to_dict already encodes non-finite floats, so a NaN here is a bug to surface.
    return atomic_write(Path(path), json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")


def write_markdown(report: ParityReport, path: Path) -> Path:
    """Write a Markdown summary (verdict, failures, settings, metric tables) to ``path``; returns ``path``."""
    return atomic_write(Path(path), _markdown(report))


def write_junit(report: ParityReport, path: Path) -> Path:
    """Write JUnit XML to ``path``: one test case per component output and per image; returns ``path``.

    Test cases are named ``component:unet/out_sample`` and ``image:text2img[0]``, with class name
    ``diffship.parity.<backend>.<precision>``; a failing one holds a ``<failure>`` with every failure.
    """
    return atomic_write(Path(path), _junit(report))


def write_html(report: ParityReport, folder: Path) -> list[Path]:
    """Write ``index.html`` and the image PNGs into ``folder``; returns the written paths.

    Records the PNG names (relative to ``folder``) in each :attr:`ImageResult.files`, so JSON written
    afterwards refers to them; an image whose arrays are gone (a report read back from JSON) loses its
    ``files``, since they would not be in this folder.
    """
    folder = Path(folder)
    written: list[Path] = []
    scales: list[float | None] = []  # heat-map scale per image, for the captions
    for image, stem in zip(report.images, _stems(report.images)):
        paths, scale = _write_image_files(folder, image, stem)
        written += paths
        scales.append(scale)
    written.append(atomic_write(folder / INDEX_HTML, _html(report, scales)))
    return written


def write_report(report: ParityReport, folder: Path) -> list[Path]:
    """Write ``report.json``, ``report.md``, ``index.html`` and the images into ``folder``.

    Returns:
        The written paths.
    """
    folder = Path(folder)
    # HTML first: it records the image file names that the JSON then refers to.
    written = write_html(report, folder)
    written.append(write_json(report, folder / REPORT_JSON))
    written.append(write_markdown(report, folder / REPORT_MARKDOWN))
    return written


def difference_heatmap(eager: Any, exported: Any) -> tuple[np.ndarray, float]:
    """Colour the per-pixel mean absolute difference over channels.

    Args:
        eager: H x W x C image, floats in [0, 1] (or uint8).
        exported: same shape.

    Returns:
        ``(rgb, scale)``: an H x W x 3 uint8 image where the colour ramp :data:`HEATMAP_STOPS` runs from 0
        to ``scale``, the largest finite difference; non-finite pixels get the top colour.
    """
    diff = np.abs(as_image(exported) - as_image(eager)).mean(axis=2)
    finite = np.isfinite(diff)
    scale = float(diff[finite].max()) if finite.any() else 0.0
    t = np.where(finite, diff / scale if scale > 0 else 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(HEATMAP_STOPS))
    rgb = np.stack([np.interp(t, stops, HEATMAP_STOPS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8), scale


# --- files -------------------------------------------------------------------------------------------


def _stems(images: list[ImageResult]) -> list[str]:
    """File name stems per image, ``text2img-0``, made unique and safe for file names and URLs."""
    stems: list[str] = []
    for pos, image in enumerate(images):
        stem = f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', image.task)}-{image.index}"
        stems.append(f"{stem}-{pos}" if stem in stems else stem)
    return stems


def _write_image_files(folder: Path, image: ImageResult, stem: str) -> tuple[list[Path], float | None]:
    """Write one image's PNGs and record them in ``image.files``; returns the paths and the heat-map scale."""
    pixels = {k: v for k, v in (("eager", image.eager_image), ("exported", image.exported_image)) if v is not None}
    scale = None
    if len(pixels) == 2 and as_image(pixels["eager"]).shape == as_image(pixels["exported"]).shape:
        pixels["diff"], scale = difference_heatmap(pixels["eager"], pixels["exported"])
    image.files = {}
    paths = []
    for kind, value in pixels.items():
        relative = f"{IMAGES_DIR}/{stem}-{kind}.png"
        paths.append(atomic_write(folder / relative, _png(value)))
        image.files[kind] = relative
    return paths, scale


def _png(image: Any) -> bytes:
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = (np.clip(np.nan_to_num(as_image(pixels), nan=0.0), 0.0, 1.0) * 255).round().astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return png_bytes(Image.fromarray(pixels))


# --- tables shared by Markdown and HTML --------------------------------------------------------------


def _verdict(report: ParityReport) -> str:
    checks = list(report.checks())
    failed = sum(bool(c.failures) for c in checks)
    if report.passed:
        return f"PASSED: all {len(checks)} comparisons within tolerance"
    if not report.components and not report.images:
        return "FAILED: nothing was compared"
    return f"FAILED: {failed} of {len(checks)} comparisons outside tolerance"


def _metric_cells(metrics: Any, tolerance: Any, limits: tuple[tuple[str, str, str], ...]) -> list[Cell]:
    cells = []
    for metric, key, bound in limits:
        value, limit = getattr(metrics, metric), getattr(tolerance, key)
        shown, shown_limit = format_pair(metric, value, limit)
        text = shown if limit is None else f"{shown} ({'≤' if bound == MAX else '≥'} {shown_limit})"
        cells.append((text, not within_limit(value, limit, bound)))
    return cells


def _common_cells(metrics: Any, passed: bool) -> list[Cell]:
    """The non-finite count and the verdict, the last columns of both tables."""
    count = metrics.nonfinite_expected + metrics.nonfinite_actual
    return [(str(count), count > 0), ("pass" if passed else "FAIL", not passed)]


def _output_table(component: ComponentResult) -> tuple[list[str], list[list[Cell]]]:
    headers = ["output", *(m for m, _, _ in TENSOR_LIMITS), "non-finite", "result"]
    rows = [
        [(o.name, False), *_metric_cells(o.metrics, o.tolerance, TENSOR_LIMITS), *_common_cells(o.metrics, o.passed)]
        for o in component.outputs
    ]
    return headers, rows


def _image_table(report: ParityReport) -> tuple[list[str], list[list[Cell]]]:
    headers = ["image", *(m for m, _, _ in IMAGE_LIMITS), "mean_abs", "non-finite", "result"]
    rows = [
        [
            (i.label, False),
            *_metric_cells(i.metrics, i.tolerance, IMAGE_LIMITS),
            (format_pair("mean_abs", i.metrics.mean_abs, None)[0], False),
            *_common_cells(i.metrics, i.passed),
        ]
        for i in report.images
    ]
    return headers, rows


def _pairs(items: dict[str, Any]) -> list[list[Cell]]:
    return [[(str(k), False), (str(v), False)] for k, v in items.items()]


def _about(report: ParityReport) -> dict[str, Any]:
    return {
        "source": report.source,
        "export": report.export,
        "backend": report.backend,
        "precision": report.precision,
        "evaluator": report.evaluator,
        "runtime settings": describe_settings(report.runtime),
        "started": report.started,
        "duration": f"{report.seconds:.1f} s",
    }


def _component_title(component: ComponentResult) -> str:
    calls = f"{component.calls} call{'' if component.calls == 1 else 's'}"
    return f"{component.component}: {calls}, {component.seconds:.2f} s"


# --- Markdown ----------------------------------------------------------------------------------------


def _markdown(report: ParityReport) -> str:
    out = [f"# diffship parity: {report.backend} {report.precision}", "", f"**{_verdict(report)}**", ""]
    out += _md_table(["", ""], _pairs(_about(report)))
    if failures := report.failures():
        out += ["## Failures", "", *(f"- {_md_escape(f)}" for f in failures), ""]
    if report.settings:
        out += ["## Settings", "", *_md_table(["setting", "value"], _pairs(report.settings))]
    if report.components:
        out += ["## Components", ""]
        for c in report.components:
            out += [f"### {_md_escape(_component_title(c))}", ""]
            out += _md_table(*_output_table(c)) if c.outputs else ["No outputs were compared.", ""]
    if report.images:
        out += ["## Images", "", *_md_table(*_image_table(report))]
    if report.versions:
        out += ["## Versions", "", *_md_table(["package", "version"], _pairs(report.versions))]
    return "\n".join(out).rstrip() + "\n"


def _md_table(headers: list[str], rows: list[list[Cell]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    body = [line([f"**{_md_escape(t)}**" if bad else _md_escape(t) for t, bad in row]) for row in rows]
    return [line(headers), line(["---"] * len(headers)), *body, ""]


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


# --- JUnit -------------------------------------------------------------------------------------------


def _junit(report: ParityReport) -> bytes:
    checks = list(report.checks())
    suite = ET.Element(
        "testsuite",
        name="diffship.parity",
        tests=str(len(checks)),
        failures=str(sum(bool(c.failures) for c in checks)),
        errors="0",
        skipped="0",
        time=_xml_seconds(report.seconds),
    )
    if timestamp := _junit_timestamp(report.started):
        suite.set("timestamp", timestamp)
    properties = ET.SubElement(suite, "properties")
    for name, value in _about(report).items():
        ET.SubElement(properties, "property", name=name, value=str(value))
    classname = f"diffship.parity.{report.backend}.{report.precision}"
    for check in checks:
        case = ET.SubElement(
            suite, "testcase", classname=classname, name=f"{check.kind}:{check.name}", time=_xml_seconds(check.seconds)
        )
        if check.failures:
            failure = ET.SubElement(case, "failure", message="; ".join(check.failures), type="ParityFailure")
            failure.text = "\n".join(check.failures)
    ET.indent(suite)
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True) + b"\n"


def _xml_seconds(seconds: float) -> str:
    return f"{seconds:.3f}" if math.isfinite(seconds) else "0"


def _junit_timestamp(started: str) -> str | None:
    """The JUnit schema's timestamp form (naive, here UTC); None when ``started`` is not ISO 8601."""
    try:
        when = datetime.fromisoformat(started)
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when.strftime("%Y-%m-%dT%H:%M:%S")


# --- HTML --------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
td.bad { color: #b00020; font-weight: 600; }
.verdict { font-size: 1.2em; font-weight: 700; padding: .5em .8em; border-radius: 4px; display: inline-block; }
.verdict.pass { background: #e3f5e3; color: #14591a; } .verdict.fail { background: #fde7e9; color: #b00020; }
.failures li { color: #b00020; font-family: ui-monospace, monospace; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { width: 300px; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: .9em; color: #555; max-width: 300px; }
.ramp { height: 10px; width: 300px; margin-top: .2em; }
"""


def _html(report: ParityReport, scales: list[float | None]) -> str:
    e = html.escape
    ok = report.passed
    title = f"diffship parity: {report.backend} {report.precision}"
    parts = [
        f"<h1>{e(title)}</h1>",
        f'<p class="verdict {"pass" if ok else "fail"}">{e(_verdict(report))}</p>',
        _html_table(["", ""], _pairs(_about(report))),
    ]
    if failures := report.failures():
        parts += ["<h2>Failures</h2>", '<ul class="failures">', *(f"<li>{e(f)}</li>" for f in failures), "</ul>"]
    if report.images:
        parts += ["<h2>Images</h2>", _html_table(*_image_table(report))]
        parts += [_html_image(i, scale) for i, scale in zip(report.images, scales)]
    if report.components:
        parts.append("<h2>Components</h2>")
        for c in report.components:
            parts.append(f"<h3>{e(_component_title(c))}</h3>")
            parts.append(_html_table(*_output_table(c)) if c.outputs else "<p>No outputs were compared.</p>")
    if report.settings:
        parts += ["<h2>Settings</h2>", _html_table(["setting", "value"], _pairs(report.settings))]
    if report.versions:
        parts += ["<h2>Versions</h2>", _html_table(["package", "version"], _pairs(report.versions))]
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _html_table(headers: list[str], rows: list[list[Cell]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="bad">{e(t)}</td>' if bad else f"<td>{e(t)}</td>" for t, bad in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_image(image: ImageResult, scale: float | None) -> str:
    e = html.escape
    m = image.metrics
    psnr, _ = format_pair("psnr", m.psnr, None)
    ssim, _ = format_pair("ssim", m.ssim, None)
    verdict = "pass" if image.passed else "FAIL"
    head = f"<h3>{e(image.label)}: {verdict}, PSNR {e(psnr)}, SSIM {e(ssim)}</h3>"
    if not image.files:
        return head + "<p>The images were not kept.</p>"
    captions = {"eager": "eager (PyTorch)", "exported": "exported", "diff": "difference"}
    if scale:
        captions["diff"] = (
            f"difference: mean |exported - eager| over channels, from black = 0 to yellow = {scale:.3g} "
            "(the largest difference)"
        )
    elif scale == 0:
        captions["diff"] = "difference: none, the images are identical (scale max 0)"
    ramp = ", ".join(f"rgb({r:.0f},{g:.0f},{b:.0f})" for r, g, b in HEATMAP_STOPS)
    figures = []
    for kind, relative in image.files.items():
        extra = f'<div class="ramp" style="background: linear-gradient(to right, {ramp})"></div>' if kind == "diff" else ""
        figures.append(
            f'<figure><img src="{e(relative)}" alt="{e(image.label)} {kind}">{extra}'
            f"<figcaption>{e(captions.get(kind, kind))}</figcaption></figure>"
        )
    return head + '<div class="row">' + "".join(figures) + "</div>"

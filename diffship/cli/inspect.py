"""``diffship inspect EXPORTED``: components, IO, sizes, and verification of every file's sha256."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from diffship.cli import app
from diffship.cli._common import component_summary, out, plain


@app.command()
def inspect(
    exported: Path = typer.Argument(..., help="Folder written by diffship export."),
    as_json: bool = typer.Option(False, "--json", help="Print the verified manifest as JSON."),
) -> None:
    """Show what an export holds, after checking every file against its manifest (exit 2 if tampered)."""
    from diffship.backends.manifest import read_manifest

    manifest = read_manifest(exported, verify=True)
    if as_json:
        out.print_json(json.dumps(manifest.to_dict()))
        return
    src = manifest.source
    shapes = manifest.shapes
    profile = shapes.profile
    # Everything below comes from the manifest, which anyone can edit: printed as plain text, never as
    # rich markup or terminal control sequences.
    say(f"{exported}: {manifest.pipeline_class} ({manifest.family}), backend {manifest.backend}, "
        f"{manifest.precision}")
    if manifest.origin != "diffship":
        how = "adopted: diffship adopt wrote its manifest" if manifest.files else "no diffship manifest"
        say(f"origin: {manifest.origin} ({how}; `diffship parity SOURCE {exported}` checks it)")
    say(f"source: {src.name} ({src.kind}, fingerprint {src.fingerprint[:12] or 'not recorded'})")
    kind = "static" if shapes.static else "dynamic (traced at)"
    say(f"shapes: {kind} {profile.height}x{profile.width}, batch {profile.batch_size}")
    table = Table("component", "io", "name", "dtype", "dims", "files / size")
    for name, entry in manifest.components.items():
        precision_label, size = component_summary(exported / name, entry)
        rows = [("in", io) for io in entry.inputs] + [("out", io) for io in entry.outputs]
        for i, (direction, io) in enumerate(rows):
            first = i == 0
            table.add_row(*map(plain, (f"{name} [{precision_label}]" if first else "", direction, io.name, io.dtype,
                                       "(" + ", ".join(map(str, io.dims)) + ")",
                                       f"{', '.join(entry.files)} {size}" if first else "")))
    out.print(table)
    _print_details(manifest)
    if not manifest.files:
        versions = f"; versions its models record: {_versions(manifest)}" if manifest.versions else ""
        say(f"not verified: {manifest.origin} records no hashes (diffship adopt records them){versions}")
        return
    say(f"versions: {_versions(manifest)}")
    say(f"verified: {len(manifest.files)} files match their sha256")


def _versions(manifest) -> str:
    return ", ".join(f"{k} {v}" for k, v in manifest.versions.items())


#: detail keys shown elsewhere (profiles get their own table) or too bulky for one line.
_SEPARATE = ("profiles", "timings", "notes", "onnx")


def _print_details(manifest) -> None:
    """Backend facts per component (engine, targets, ...), and shape-profile tables where recorded."""
    from diffship.configs.fields import to_data

    for name, entry in manifest.components.items():
        details = {k: v for k, v in to_data(entry.details, drop_none=True).items() if k not in _SEPARATE}
        if details:
            say(f"{name}: " + "; ".join(f"{k} {_compact(v)}" for k, v in details.items()))
        for index, profile in enumerate(getattr(entry.details, "profiles", [])):
            table = Table("input", "min", "opt", "max", title=plain(f"{name} profile {index}: {profile.request.describe()}"))
            for input_name, r in profile.inputs.items():
                table.add_row(*map(plain, (input_name, *(_fmt(v) for v in (r.min, r.opt, r.max)))))
            out.print(table)


def _compact(value) -> str:
    """One line for a detail: ``k=v`` for dicts (None left out), ``64x64`` for size lists."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return ", ".join("x".join(map(str, v)) for v in value)
    if isinstance(value, list):
        return ("; " if any(isinstance(v, dict) for v in value) else ", ").join(_compact(v) for v in value)
    return str(value)


def _fmt(dims: list) -> str:
    return "(" + ", ".join(map(str, dims)) + ")"


def say(text: str) -> None:
    """One line of manifest facts, printed as plain text."""
    out.print(plain(text))

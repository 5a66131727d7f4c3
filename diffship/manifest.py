"""The export manifest ``diffship.json``: what was exported, from what, with which libraries.

Written last, after every other file, so a folder without it is never a finished export. It records the
sha256 of every file; :func:`read_manifest` refuses a folder whose files changed.

Schema (``format: diffship.export/1``)::

    format, diffship_version, created (ISO time)
    backend, precision, family, pipeline_class
    tasks: the pipeline tasks this export can run (text2img, img2img, inpaint)
    source: {name, kind, path, pipeline_class, fingerprint}
    shapes: {static: bool, profile: {batch_size, height, width, sequence_length, guidance}}
    components: {<name>: {source, precision, files, inputs, outputs, details}}
    versions: {python, torch, diffusers, transformers, <backend libraries>}
    files: {<relative path>: <sha256>}   # every file but diffship.json
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

from diffship._files import read_json, sha256_file, write_json
from diffship.errors import ExportedModelError

MANIFEST = "diffship.json"
FORMAT = "diffship.export/1"
REQUIRED = ("backend", "precision", "family", "pipeline_class", "tasks", "source", "shapes", "components",
            "versions", "files")


def library_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from diffship import __version__

    return {"diffship": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, **(extra or {})}


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` except the manifest, by relative POSIX path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Complete ``data`` with format, time and file hashes, and write it as the folder's manifest."""
    from diffship import __version__

    manifest = {"format": FORMAT, "diffship_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **data, "files": file_hashes(folder)}
    write_json(folder / MANIFEST, manifest)
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`ExportedModelError` if a recorded file is missing or its sha256 differs."""
    for rel, digest in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise ExportedModelError(f"{folder}: {rel} is missing; the export is incomplete, re-run diffship export")
        if sha256_file(path) != digest:
            raise ExportedModelError(
                f"{folder}: {rel} does not match the sha256 in {MANIFEST} (modified or corrupted); re-run diffship export"
            )


def read_manifest(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read (and by default verify) the manifest of an exported folder.

    Raises:
        ExportedModelError: no such folder, no manifest (not an export, or an interrupted one), an
            unknown format, or files that do not match their recorded sha256.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportedModelError(f"{folder}: no such folder; export one with: diffship export SOURCE {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportedModelError(
            f"{folder} is not a diffship export (no {MANIFEST}); it may be an unfinished export: re-run diffship export"
        )
    try:
        manifest = read_json(path)
    except ValueError as exc:
        raise ExportedModelError(f"{path} is not valid JSON ({exc}); re-run diffship export") from None
    if manifest.get("format") != FORMAT:
        raise ExportedModelError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; re-export")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ExportedModelError(f"{path} lacks {', '.join(missing)} (written by an older diffship?); re-export")
    if verify:
        verify_files(folder, manifest)
    return manifest

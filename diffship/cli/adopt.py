"""``diffship adopt FOLDER``: a diffship manifest for an optimum export, so later loads verify its files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffship.cli import app
from diffship.cli._common import out


@app.command()
def adopt(
    folder: Path = typer.Argument(..., help="Folder written by optimum-cli export onnx|openvino."),
    source: Optional[str] = typer.Option(None, "--source", help="What it was exported from (folder, file or "
                                         "preset): its fingerprint is recorded, and parity checks it."),
) -> None:
    """Write diffship.json beside an optimum export: its IO, origin and the sha256 of every file."""
    from diffship.backends.foreign import adopt as adopt_folder

    manifest = adopt_folder(folder, source)
    what = f"from {manifest.source.name}" if manifest.source.fingerprint else "source not recorded (--source)"
    out.print(f"adopted {folder}: {manifest.origin} export, {manifest.backend} {manifest.precision}, "
              f"{len(manifest.components)} components, {len(manifest.files)} files hashed, {what}", markup=False)

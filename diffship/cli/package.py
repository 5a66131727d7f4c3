"""``diffship package EXPORTED --target swift OUT``: resources for native apps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffship.cli import app
from diffship.cli._common import out, steps
from diffship.errors import DiffshipError

TARGETS = ("swift",)


@app.command()
def package(
    exported: Path = typer.Argument(..., help="Folder written by diffship export (--backend coreml for swift)."),
    output: Path = typer.Argument(..., metavar="OUT", help="Resource folder to create (written atomically)."),
    target: str = typer.Option(..., "--target", help="swift: Apple's ml-stable-diffusion Swift package."),
    chunk_unet: bool = typer.Option(False, "--chunk-unet", help="Split the UNet into UnetChunk1 + UnetChunk2."),
    compile_models: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                                  help="Compile to .mlmodelc (default: where xcrun exists)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check chained UNet chunks against the whole."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it is an earlier package."),
) -> None:
    """Write what a native app loads: for swift, the resource folder of Apple's StableDiffusionPipeline."""
    if target not in TARGETS:
        raise DiffshipError(f"unknown package target {target!r}; choose one of: {', '.join(TARGETS)}")
    from diffship.packaging.swift import COMPILE_SCRIPT, package_swift

    with steps(f"packaging {exported} for {target}") as say:
        facts = package_swift(exported, output, chunk_unet=chunk_unet, compile_models=compile_models, verify=verify,
                              overwrite=overwrite, progress=say)
    out.print(f"wrote {output}: {', '.join(facts['resources'])}")
    if "chunk_max_abs_error" in facts:
        out.print(f"chained UNet chunks match the whole UNet (max abs difference {facts['chunk_max_abs_error']:.2e})")
    if not facts["compiled"]:
        out.print(f"not compiled (no xcrun here): run {output / COMPILE_SCRIPT} on a Mac with Xcode")
    for note in facts["notes"]:
        out.print(f"[yellow]note[/]: {note}")

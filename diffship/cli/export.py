"""``diffship export SOURCE OUT``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from diffship.cli import app
from diffship.cli._common import component_summary, out, parse_options, parse_size, steps


@app.command()
def export(
    source: str = typer.Argument(..., help="Diffusers folder, single-file .safetensors checkpoint, or preset (tiny)."),
    output: Path = typer.Argument(..., metavar="OUT", help="Folder to create (written atomically)."),
    backend: str = typer.Option("onnx", "--backend", "-b", help="Export backend."),
    precision: str = typer.Option("fp32", "--precision", "--weights", "-p",
                                  help="fp32 or fp16 (overflowing parts stay fp32); weight formats per backend: openvino int8 and int4, "
                                       "coreml palette4/6/8, palette-mixed (per-weight widths, -o target_psnr) and int8; "
                                       "full-int8 (onnx, openvino): 8-bit weights and activations in the denoiser "
                                       "and, where it passes, the VAE decoder."),
    static: Optional[str] = typer.Option(None, "--static", metavar="HxW", help="Fixed image size instead of dynamic shapes."),
    batch: int = typer.Option(1, "--batch", min=1, help="Images per call (fixed when --static)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Activation quantization, calibrated on "
                                           "eager runs (openvino: hybrid-int8; onnx, openvino: full-int8); sets the precision."),
    calibration_size: Optional[str] = typer.Option(None, "--calibration-size", metavar="HxW",
                                                   help="Size of the eager runs calibrated precisions record "
                                                        "(default: the export's; onnx at most 256 a side)."),
    calibration_steps: Optional[int] = typer.Option(None, "--calibration-steps", min=1,
                                                    help="Denoising steps of those runs (default 10; give the "
                                                         "steps you will run)."),
    guidance: bool = typer.Option(True, "--guidance/--no-guidance",
                                  help="Requests use classifier-free guidance (a static UNet then takes 2x the batch)."),
    component: Optional[list[str]] = typer.Option(None, "--component", help="Export only this component (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Local diffusers folder with the configs of a single-file checkpoint."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow .ckpt/.bin weights (torch.load weights_only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream",
                                          help="Copy weights from the source's files as they are written, never "
                                               "loading the model (default: wherever the backend can)."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", metavar="KEY=VALUE",
                                               help="Backend-specific export option (repeatable; JSON values)."),
) -> None:
    """Export every component of a pipeline to BACKEND, with a manifest of sha256 hashes."""
    from diffship.reference.memory import return_large_frees
    from diffship.workflows import export_pipeline

    return_large_frees()  # a process that exports: weights read and dropped one after another
    start = time.perf_counter()
    with steps(f"exporting {source}") as say:
        manifest = export_pipeline(
            source, output, backend=backend, precision=quantize or precision, static=parse_size(static), batch_size=batch,
            guidance=guidance, backend_options=parse_options(option),
            overwrite=overwrite, config=config, allow_pickle=allow_pickle, components=component, progress=say,
            stream=stream, calibration_size=parse_size(calibration_size), calibration_steps=calibration_steps,
        )
    table = Table("component", "precision", "inputs", "outputs", "size", title=f"{backend} export")
    for name, entry in manifest.components.items():
        precision_label, size = component_summary(output / name, entry)
        table.add_row(name, precision_label, ", ".join(entry.input_names), ", ".join(entry.output_names), size)
    out.print(table)
    for name, entry in manifest.components.items():
        if timings := getattr(entry.details, "timings", None):
            notes = getattr(entry.details, "notes", [])
            out.print(f"{name}: " + ", ".join(f"{step.replace('_', ' ')} {sec:.2f}s" for step, sec in timings.items())
                      + "".join(f"; {note}" for note in notes))
    out.print(f"exported to {output} in {time.perf_counter() - start:.1f}s")

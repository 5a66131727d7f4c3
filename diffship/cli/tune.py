"""``diffship tune SOURCE OUT --backend openvino|onnx``: the fastest export that keeps the image, chosen here."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from diffship.cli import app
from diffship.cli._common import out, parse_size, steps
from diffship.configs.fields import comma_list
from diffship.errors import ParityFailure


@app.command()
def tune(
    source: str = typer.Argument(..., help="Diffusers folder, single-file checkpoint, or preset (tiny)."),
    output: Path = typer.Argument(..., metavar="OUT", help="Export folder to write with the chosen mode."),
    backend: str = typer.Option("openvino", "--backend", "-b", help="openvino or onnx."),
    min_psnr: float = typer.Option(35.0, "--min-psnr", help="Image PSNR floor (dB) against eager fp32."),
    size: Optional[str] = typer.Option(None, "--size", metavar="HxW", help="Test image size (default: the pipeline's)."),
    steps_: int = typer.Option(4, "--steps", min=1, help="Denoising steps per test image."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per mode, after one warm-up."),
    candidates: Optional[str] = typer.Option(None, "--candidates", metavar="A,B",
                                             help="Only these modes (e.g. fp32@f32,full-int8@bf16)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it is an export."),
) -> None:
    """Try each precision x runtime mode on this machine (speed, image PSNR against eager fp32) and write the
    fastest that meets --min-psnr, its runtime settings in the manifest and the table in OUT/tune.md."""
    from diffship.bench.tune import tune as run_tune

    with steps(f"tuning {source} on {backend}") as say:
        try:
            result = run_tune(source, output, backend, min_psnr=min_psnr, size=parse_size(size), steps=steps_,
                              repeats=repeats, only=comma_list(candidates) if candidates else None,
                              overwrite=overwrite, progress=say)
        except ParityFailure as exc:
            if (failed := getattr(exc, "result", None)) is not None:
                _print(failed)
            raise
    _print(result)
    out.print(f"wrote {output} ({result.chosen}); load_pipeline({str(output)!r}) runs it that way")


def _print(result) -> None:
    s = result.settings
    table = Table("mode", "export s", "s / image", "x eager fp32", "image PSNR dB", "denoiser PSNR dB", "",
                  title=f"tune: {result.backend}, {s['height']}x{s['width']}, {s['steps']} steps, "
                        f"floor {result.min_psnr:g} dB ({result.machine.get('cpu', '?')})")
    for row in result.rows():
        table.add_row(*row)
    out.print(table)

"""``diffship demo``: the built-in pipeline through every backend usable here, end to end."""

from __future__ import annotations

from pathlib import Path

import typer

from diffship._files import atomic_write, png_bytes
from diffship.cli import app
from diffship.cli._common import console, out, steps
from diffship.errors import MissingBackendError, ParityFailure


@app.command()
def demo(
    output: Path = typer.Option(Path("diffship-demo"), "--out", help="Folder for exports, images and reports."),
    steps_: int = typer.Option(10, "--steps", min=1, help="Denoising steps."),
    prompt: str = typer.Option("a photograph of an astronaut riding a horse", "--prompt"),
) -> None:
    """Export `tiny` to every backend installed here, generate with each, check parity, say where it all is.

    Backends that export here but cannot run here (TensorRT engines without an NVIDIA GPU) are
    exported, and the reason they are not run is printed."""
    import torch

    from diffship import backends as registry
    from diffship.cli.parity import run_parity
    from diffship.runtimes.pipeline import open_export
    from diffship.workflows import export_pipeline

    exportable = registry.installed()
    export_only = {b: reason for b in exportable if (reason := registry.runtime_unavailable_reason(b))}
    backends = [b for b in exportable if b not in export_only]
    if not backends:
        raise MissingBackendError("onnx", "onnxruntime", "onnx")
    console.print(f"backends usable here: {', '.join(backends)}"
                  + (f"; export only: {', '.join(export_only)}" if export_only else ""))
    for backend, reason in export_only.items():
        with steps(f"{backend}: export") as say:
            export_pipeline("tiny", output / backend / "export", backend=backend, overwrite=True, progress=say)
    results = {}
    for backend in backends:
        folder = output / backend
        with steps(f"{backend}: export") as say:
            export_pipeline("tiny", folder / "export", backend=backend, overwrite=True, progress=say)
            say("generating an image")
            with open_export(folder / "export") as loaded:
                pipe = loaded.pipeline
                pipe.set_progress_bar_config(disable=True)
                image = pipe(prompt, num_inference_steps=steps_, generator=torch.Generator().manual_seed(0)).images[0]
            atomic_write(folder / "images" / "generated.png", png_bytes(image))
        results[backend] = run_parity("tiny", folder / "export", steps_=steps_, report=folder / "report",
                                      junit=folder / "report" / "junit.xml")
    out.print("\n[bold]demo results[/]")
    for backend, result in results.items():
        verdict = "[green]parity passed[/]" if result.passed else "[red]parity FAILED[/]"
        out.print(f"{backend}: {verdict}\n  export: {output / backend / 'export'}\n  image:  "
                  f"{output / backend / 'images' / 'generated.png'}\n  report: {output / backend / 'report' / 'index.html'}")
    for backend, reason in export_only.items():
        out.print(f"{backend}: exported, not run ({reason})\n  export: {output / backend / 'export'}")
    failed = [b for b, r in results.items() if not r.passed]
    if failed:
        raise ParityFailure(f"parity failed for {', '.join(failed)}; see the reports above")

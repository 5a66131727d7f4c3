"""``diffship parity SOURCE EXPORTED [OTHER]``: exit 1 when any comparison is outside its tolerance.

With OTHER, three checks run: EXPORTED vs eager, OTHER vs eager, and OTHER vs EXPORTED (the same recorded
calls and requests through both exports, judged by both exports' tolerances combined); ``--report DIR``
and ``--junit FILE`` then get one report each (``DIR/a``, ``DIR/b``, ``DIR/b-vs-a``; ``FILE`` with those
suffixes before its extension).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from diffship.cli import app
from diffship.backends.base import describe_settings
from diffship.cli._common import out, parse_size, runtime_options, steps
from diffship.errors import DiffshipError, ParityFailure


@app.command()
def parity(
    source: str = typer.Argument(..., help="The eager source the export was made from."),
    exported: Path = typer.Argument(..., help="Folder written by diffship export (or optimum)."),
    other: Optional[Path] = typer.Argument(None, metavar="[OTHER]", help="A second export of SOURCE: both are "
                                           "checked against eager, and OTHER against EXPORTED."),
    steps_: int = typer.Option(10, "--steps", min=1, help="Denoising steps of the end-to-end runs."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt (default: a fixed test prompt)."),
    seed: int = typer.Option(0, "--seed", help="Seed of both runs."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Scheduler class for both runs."),
    size: Optional[str] = typer.Option(None, "--size", metavar="HxW", help="Image size (default: the export's)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write report.json, report.md and index.html here."),
    tolerances: Optional[Path] = typer.Option(None, "--tolerances", help="TOML file replacing the bundled tolerances."),
    config: Optional[Path] = typer.Option(None, "--config", help="Configs folder for a single-file SOURCE."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights in SOURCE."),
    device: Optional[str] = typer.Option(None, "--device", help="Where to run (onnx: cpu, cuda, tensorrt; comma list = fallbacks)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Runtime threads."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", metavar="KEY=VALUE",
                                               help="Backend-specific runtime option (repeatable; JSON values)."),
    component: Optional[str] = typer.Option(None, "--component", metavar="NAME",
                                            help="Check only NAME, on one call of seeded inputs, eager reading its "
                                                 "weights layer by layer (for models larger than memory)."),
) -> None:
    """Compare an export with eager PyTorch: every component on recorded inputs, and the final images."""
    options = runtime_options(device, threads, option)
    if component and other is not None:
        raise DiffshipError("--component compares one export with eager PyTorch; give one export, not OTHER")
    runs = [("", exported, None)] if other is None else [("a", exported, None), ("b", other, None),
                                                          ("b-vs-a", other, exported)]
    failed = []
    for label, folder, reference in runs:
        result = run_parity(source, folder, reference=reference, steps_=steps_, prompt=prompt, seed=seed,
                            scheduler=scheduler, size=size, junit=_labelled(junit, label, file=True),
                            report=_labelled(report, label), tolerances=tolerances, config=config,
                            allow_pickle=allow_pickle, options=options, component=component)
        failed += [f"{label + ': ' if label else ''}{f}" for f in result.failures()]
    if failed:
        raise ParityFailure(f"parity failed: {len(failed)} check(s) outside tolerance, first: {failed[0]}")


def _labelled(path: Optional[Path], label: str, file: bool = False) -> Optional[Path]:
    """``path`` for one of several checks: a subfolder ``label``, or for a file ``label`` before its suffix."""
    if path is None or not label:
        return path
    return path.with_name(f"{path.stem}-{label}{path.suffix}") if file else path / label


def run_parity(source, exported, *, reference=None, steps_=10, prompt=None, seed=0, scheduler=None, size=None,
               junit=None, report=None, tolerances=None, config=None, allow_pickle=False, options=None,
               component=None):
    """Run the checks (of one ``component`` on one call, where given), print the summary and write the
    requested reports (shared with ``demo``)."""
    from dataclasses import replace

    from diffship._files import check_writable

    if junit:  # refused now, not after the whole run
        check_writable(junit, folder=False)
    if report:
        check_writable(report)

    from diffship.parity.compare import ParitySettings, check_parity
    from diffship.parity.report import write_junit, write_report

    settings = ParitySettings(steps=steps_, seed=seed, scheduler=scheduler)
    if prompt:
        settings = replace(settings, prompt=prompt)
    if hw := parse_size(size):
        settings = replace(settings, height=hw[0], width=hw[1])
    with steps(f"parity {exported}") as say:
        if component:
            from diffship.parity.one_call import check_one_call

            hw = parse_size(size) or (None, None)
            result = check_one_call(source, exported, component, height=hw[0], width=hw[1], seed=seed,
                                    tolerances_file=tolerances, runtime_options=options, progress=say)
        else:
            result = check_parity(source, exported, reference=reference, settings=settings, tolerances_file=tolerances,
                                  config=config, allow_pickle=allow_pickle, runtime_options=options, progress=say)
    print_summary(result)
    if report:
        paths = write_report(result, report)
        out.print(f"report: {next(p for p in paths if p.name == 'index.html')}")
    if junit:
        write_junit(result, junit)
        out.print(f"junit: {junit}")
    return result


def print_summary(result) -> None:
    table = Table("check", "max abs", "cosine", "PSNR dB", "SSIM", "verdict",
                  title=f"parity: {result.backend} {result.precision} vs {result.reference or 'eager'} "
                        f"({result.evaluator}; {describe_settings(result.runtime)})")
    for comp in result.components:
        for o in comp.outputs:
            m = o.metrics
            table.add_row(f"{comp.component}/{o.name} ({comp.calls} calls)", f"{m.max_abs:.2e}", f"{m.cosine:.6f}",
                          f"{m.psnr:.1f}", "", _verdict(o.passed))
    for img in result.images:
        m = img.metrics
        table.add_row(f"image {img.label}", f"{m.max_abs:.2e}", "", f"{m.psnr:.1f}", f"{m.ssim:.4f}", _verdict(img.passed))
    out.print(table)
    for failure in result.failures():
        out.print(f"[red]FAIL[/] {failure}")
    out.print("[green]parity passed[/]" if result.passed else "[red]parity failed[/]")


def _verdict(passed: bool) -> str:
    return "[green]pass[/]" if passed else "[red]FAIL[/]"

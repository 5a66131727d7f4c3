"""``diffship bench``: eager PyTorch and exports side by side; ``diffship bench compare A B``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffship.cli import app
from diffship.cli._common import console, out, parse_options
from diffship.errors import BenchRegression, DiffshipError

bench_app = typer.Typer(help="Benchmark eager PyTorch and exports side by side (speed, memory, parity).")
app.add_typer(bench_app, name="bench")


def _split(text: Optional[str], kind: type = str) -> Optional[list]:
    if text is None:
        return None
    try:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DiffshipError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None


def _per_backend(pairs: Optional[list[str]]) -> dict[str, dict[str, Any]]:
    """``["onnx:threads=2"]`` -> ``{"onnx": {"threads": 2}}``."""
    options: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        backend, sep, rest = pair.partition(":")
        if not sep or not backend:
            raise DiffshipError(f"option {pair!r} is not BACKEND:KEY=VALUE (e.g. onnx:threads=2)")
        options.setdefault(backend, {}).update(parse_options([rest]))
    return options


class _Bars:
    """Rich progress bars for the phases of a run: one bar per phase, closed when the next starts."""

    def __init__(self, progress: Progress):
        self.progress, self.task, self.name, self.done = progress, None, "", 0

    def _close(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.done, description=f"[green]✓[/] {self.name}")
            self.progress.stop_task(self.task)

    def phase(self, name: str, total: int) -> None:
        self._close()
        self.task, self.name, self.done = self.progress.add_task(name, total=total), name, 0

    def advance(self, text: str = "") -> None:
        # Called as a step starts: the bar shows the steps finished and names the one running.
        self.progress.update(self.task, completed=self.done, description=f"{self.name}: {text}")
        self.done += 1

    def note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]![/] {text}")

    finish = _close


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    preset: str = typer.Option("tiny", "--preset", help="Settings preset (configs/bench_presets.toml): tiny, sd15-arch, sd15-arch-modes, sd3-arch, sdxl-arch-export, flux-arch-export."),
    source: Optional[str] = typer.Option(None, "--source", help="What to benchmark instead of the preset's (folder, file, preset)."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma list: torch and export backends, or auto."),
    precisions: Optional[str] = typer.Option(None, "--precisions", help="Export precisions, comma list (fp32,fp16)."),
    torch_precisions: Optional[str] = typer.Option(None, "--torch-precisions", help="Eager precisions (fp32,bf16)."),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="HxW list; the first is the default size."),
    batches: Optional[str] = typer.Option(None, "--batches", help="Images per call for the batch sweep."),
    steps_: Optional[str] = typer.Option(None, "--steps", help="End-to-end step counts; the first is the default."),
    schedulers: Optional[str] = typer.Option(None, "--schedulers", help="Scheduler classes (default = the pipeline's)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, help="Untimed calls before each series."),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="Timed calls per component measurement."),
    e2e_repeats: Optional[int] = typer.Option(None, "--e2e-repeats", min=1, help="Timed end-to-end runs per setting."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="PyTorch threads (runtimes: -o BACKEND:threads=N)."),
    device: Optional[str] = typer.Option(None, "--device", help="Where eager PyTorch runs (cpu, cuda)."),
    output: Path = typer.Option(Path("bench-results"), "--out", help="Folder for every file of the run."),
    exports: Optional[Path] = typer.Option(None, "--exports", help="Where exports go (default OUT/exports)."),
    reuse_exports: bool = typer.Option(False, "--reuse-exports", help="Keep existing exports of the same source."),
    keep_exports: bool = typer.Option(False, "--keep-exports", help="Keep the exports this run writes (default: "
                                      "each is removed once measured; --reuse-exports keeps them too)."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", metavar="BACKEND:KEY=VALUE",
                                               help="Runtime option of one backend (repeatable)."),
    export_option: Optional[list[str]] = typer.Option(None, "--export-option", "-e", metavar="BACKEND:KEY=VALUE",
                                                      help="Export option of one backend (repeatable)."),
    export_only: bool = typer.Option(False, "--export-only", help="Measure the exports only (time, peak RSS, size)."),
    compare: Optional[list[Path]] = typer.Option(None, "--compare", metavar="FOLDER", help="An existing export "
                                                 "(diffship, optimum-onnx/-intel, Apple Core ML) measured beside "
                                                 "the others as it is (repeatable)."),
    component: Optional[list[str]] = typer.Option(None, "--component", help="With --export-only: export only this "
                                                  "component (repeatable), e.g. the UNet of a large model."),
    tune: Optional[str] = typer.Option(None, "--tune", metavar="B,..", help="Backends (onnx, openvino) that also get "
                                       "a BACKEND-tuned subject: the mode diffship tune chooses here."),
    tune_candidates: Optional[str] = typer.Option(None, "--tune-candidates", metavar="A,..",
                                                  help="The modes tune tries (e.g. fp32@bf16,full-int8@bf16)."),
    tune_min_psnr: Optional[float] = typer.Option(None, "--tune-min-psnr", help="Tune's image PSNR floor (dB)."),
) -> None:
    """Export SOURCE to every chosen backend and measure each against eager PyTorch.

    Writes results.json (schema diffship.bench/1), results.csv, results.md, latency_by_backend.png,
    resolution_scaling.png and sample images to --out, updating the JSON and CSV after every measurement."""
    if ctx.invoked_subcommand:
        return
    from diffship.bench.run import run_bench
    from diffship.configs.bench_presets import from_mapping, preset as load_preset

    overrides = {k: v for k, v in {
        "source": source, "backends": _split(backends), "precisions": _split(precisions),
        "torch_precisions": _split(torch_precisions), "sizes": _split(sizes), "batches": _split(batches, int),
        "steps": _split(steps_, int), "schedulers": _split(schedulers), "warmup": warmup, "repeats": repeats,
        "e2e_repeats": e2e_repeats, "threads": threads, "device": device,
        "runtime_options": _per_backend(option) or None, "export_options": _per_backend(export_option) or None,
        "export_only": export_only or None, "components": component,
        "compare": [str(f) for f in compare] if compare else None, "tune": _split(tune),
        "tune_candidates": _split(tune_candidates), "tune_min_psnr": tune_min_psnr,
    }.items() if v is not None}
    settings = from_mapping(overrides, "command line", base=load_preset(preset))
    command = "diffship " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bars:
        tracker = _Bars(bars)
        try:
            doc = run_bench(settings, output, exports=exports, reuse_exports=reuse_exports,
                            keep_exports=keep_exports or reuse_exports, command=command,
                            progress=tracker)
        finally:
            tracker.finish()
    _print_summary(doc)
    out.print(f"results: {output / 'results.md'} (+ results.json, results.csv, plots, images/)")
    failed = [f"{s.name}: {s.error}" for s in doc.subjects if s.error]
    if failed:
        raise DiffshipError(f"{len(failed)} subject(s) failed, first: {failed[0]}")


def _print_summary(doc) -> None:
    from diffship.bench.output import summary_rows

    header, rows = summary_rows(doc)
    table = Table(*header, title=f"diffship bench: {doc.settings['source']} on {doc.machine['cpu']}")
    for row in rows:
        table.add_row(*row)
    out.print(table)


@bench_app.command("compare")
def compare(
    before: Path = typer.Argument(..., help="results.json of the earlier run (the baseline)."),
    after: Path = typer.Argument(..., help="results.json of the run to check."),
    threshold: float = typer.Option(0.10, "--threshold", min=0.0, help="Allowed slow-down / growth (0.10 = 10%)."),
    psnr_drop: float = typer.Option(1.0, "--psnr-drop", min=0.0, help="Allowed parity PSNR loss in dB."),
    show_all: bool = typer.Option(False, "--all", help="List every compared figure, not only regressions."),
) -> None:
    """Flag figures of AFTER that regressed from BEFORE; exits 1 when any did."""
    from diffship.bench.compare import compare as compare_runs, machine_differences
    from diffship.bench.records import read_results

    a, b = read_results(before), read_results(after)
    for diff in machine_differences(a, b):
        console.print(f"[yellow]![/] machines differ ({diff}): the figures may not be comparable")
    changes = compare_runs(a, b, threshold=threshold, psnr_drop=psnr_drop)
    shown = [c for c in changes if show_all or c.regression]
    if shown:
        table = Table("measurement", "metric", "before", "after", "change", "verdict", title="bench compare")
        for c in shown:
            change = f"{c.ratio:+.1f} dB" if c.metric == "psnr_db" else f"x{c.ratio:.2f}"
            table.add_row(c.what, c.metric, f"{c.before:.4g}", f"{c.after:.4g}", change,
                          "[red]REGRESSION[/]" if c.regression else "ok")
        out.print(table)
    regressions = [c for c in changes if c.regression]
    out.print(f"{len(changes)} figures compared, {len(regressions)} regression(s) "
              f"(threshold {threshold:.0%}, PSNR drop {psnr_drop} dB)")
    if not changes:
        raise DiffshipError(f"{before} and {after} have no measurement in common; nothing was compared")
    if regressions:
        raise BenchRegression(f"{len(regressions)} regression(s), first: {regressions[0].what} {regressions[0].metric} "
                            f"{regressions[0].before:.4g} -> {regressions[0].after:.4g}")

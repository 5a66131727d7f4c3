"""``diffship tune``: the fastest export of a pipeline that keeps the image, chosen on this machine.

Every candidate mode (an export precision with runtime settings: OpenVINO's inference precision, the
8-bit modes) is exported, run end to end at the requested size and steps and timed (median after a
warm-up), and its image compared with eager fp32's (PSNR), with its denoiser's outputs compared on the
calls eager made. The fastest mode meeting the floor is then measured again under other runtime settings
(:func:`setting_variants`: one dynamic model instead of static ones, a thread per logical CPU). The fastest
candidate whose image meets the PSNR floor is written to ``out`` with its runtime settings recorded in the
manifest (``load_pipeline(out)`` runs it that way; options still override) and the table beside it
(``tune.json``, ``tune.md``). Candidates share one export per precision; calibrated precisions calibrate on
eager runs at the size tuned for. Existing exports of a precision (``exports``: a benchmark run's own) are
used as they are instead of exporting it again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from diffship import backends
from diffship._files import atomic_folder, atomic_write, check_destination
from diffship.backends.manifest import MANIFEST, read_manifest
from diffship.backends.quantized import FULL_INT8
from diffship.bench.machine import bf16_native, machine_info, physical_cores, usable_cpus
from diffship.configs.bench_presets import TUNABLE
from diffship.errors import DiffshipError, ParityFailure
from diffship.parity.compare import ParitySettings, generate_images, synthetic_image
from diffship.parity.metrics import image_metrics, tensor_metrics
from diffship.parity.result import json_safe
from diffship.reference.recording import record_calls

TABLE_JSON = "tune.json"
TABLE_MD = "tune.md"


@dataclass(frozen=True)
class Candidate:
    """One mode tried: an export precision and the runtime options it runs with.

    Attributes:
        name: its label on the command line and in the table (``full-int8@bf16``).
        precision: the export precision.
        runtime: runtime options (``{"inference_precision": "bf16"}``).
    """

    name: str
    precision: str
    runtime: dict[str, Any] = field(default_factory=dict)


def candidates(backend: str) -> list[Candidate]:
    """The modes tried for ``backend`` on this machine (bf16 compute only where the CPU has it natively)."""
    if backend == "onnx":
        return [Candidate("fp32", "fp32"), Candidate(FULL_INT8, FULL_INT8)]
    if backend == "openvino":
        computes = ("f32", "bf16") if bf16_native() else ("f32",)
        return [Candidate(f"{p}@{c}", p, {"inference_precision": c})
                for p in ("fp32", "hybrid-int8", FULL_INT8) for c in computes]
    raise DiffshipError(f"diffship tune takes --backend {' or '.join(TUNABLE)}, not {backend!r}")


def setting_variants(backend: str, mode: Candidate) -> list[Candidate]:
    """Runtime settings tried on the fastest mode that met the floor, each measured like a mode.

    OpenVINO compiles a static model per request shape by default; one dynamic model is the other way.
    Both runtimes compute with one thread per core by default; where the machine has more logical CPUs
    than cores (SMT), a thread on each is tried too.
    """
    variants = []
    if backend == "openvino":
        variants.append(Candidate(f"{mode.name} dynamic-shapes", mode.precision,
                                  {**mode.runtime, "static_shapes": False}))
    logical, cores = usable_cpus(), physical_cores()
    if logical and cores and logical > cores:
        variants.append(Candidate(f"{mode.name} threads={logical}", mode.precision, {**mode.runtime, "threads": logical}))
    return variants


@dataclass
class Trial:
    """What one candidate measured (times in seconds, PSNR in dB against eager fp32)."""

    candidate: Candidate
    export_seconds: float | None = None
    seconds: float | None = None
    image_psnr: float | None = None
    denoiser_psnr: float | None = None
    error: str | None = None

    def meets(self, floor: float) -> bool:
        return self.error is None and self.image_psnr is not None and self.image_psnr >= floor


@dataclass
class TuneResult:
    """A tune run: its settings, eager fp32's time, every trial and the choice (None: none met the floor)."""

    backend: str
    source: str
    min_psnr: float
    settings: dict[str, Any]
    eager_seconds: float
    trials: list[Trial]
    chosen: str | None
    machine: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[list[str]]:
        """The table: mode, export s, s/image, x eager fp32, image PSNR, denoiser PSNR, verdict."""
        def num(v, fmt):
            return "-" if v is None else "inf" if v == math.inf else format(v, fmt)

        rows = [["eager fp32 (PyTorch)", "-", num(self.eager_seconds, ".3f"), "1.00", "reference", "reference", ""]]
        for t in self.trials:
            speed = self.eager_seconds / t.seconds if t.seconds else None
            verdict = ("chosen" if t.candidate.name == self.chosen else "meets floor" if t.meets(self.min_psnr)
                       else f"failed: {t.error}" if t.error else "below floor")
            rows.append([t.candidate.name, num(t.export_seconds, ".1f"), num(t.seconds, ".3f"), num(speed, ".2f"),
                         num(t.image_psnr, ".1f"), num(t.denoiser_psnr, ".1f"), verdict])
        return rows

    def markdown(self) -> str:
        head = ["mode", "export s", "s / image", "x eager fp32", "image PSNR dB", "denoiser PSNR dB", ""]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows()]
        s = self.settings
        return (f"diffship tune {self.source} --backend {self.backend} --min-psnr {self.min_psnr:g} "
                f"--size {s['height']}x{s['width']} --steps {s['steps']} on {self.machine.get('cpu', '?')}\n\n"
                + "\n".join(lines) + "\n")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data (a non-finite PSNR as ``"inf"``, as parity reports write it)."""
        return json_safe(self)


def _timed(run: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``run()``'s first result (a warm-up) and the median seconds of ``repeats`` more runs."""
    result = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def tune(source: str, out: str | Path, backend: str, *, min_psnr: float = 35.0, size: tuple[int, int] | None = None,
         steps: int = 4, repeats: int = 3, only: list[str] | None = None, overwrite: bool = False,
         exports: Mapping[str, str | Path] | None = None,
         progress: Callable[[str], None] | None = None) -> TuneResult:
    """Try the candidate modes of ``backend`` on ``source`` and write the fastest one meeting ``min_psnr``.

    Args:
        source: what ``diffship export`` takes.
        out: the export folder to write (only once a candidate is chosen).
        backend: ``onnx`` or ``openvino``.
        min_psnr: the image PSNR floor (dB) against eager fp32 at the same seed.
        size: ``(height, width)`` of the test image (default: the pipeline's).
        steps / repeats: denoising steps per image; timed runs per candidate (after one warm-up).
        only: candidate names to try (default: all of :func:`candidates`).
        overwrite: replace an existing export at ``out``.
        exports: existing exports of ``source`` to ``backend`` by precision, measured instead of exporting
            that precision (left as they are: the chosen one is copied, hard-linked where the disk allows).
        progress: told what runs, with an estimate of the time left.

    Returns:
        The :class:`TuneResult` (also written as ``tune.json`` / ``tune.md`` into ``out``).

    Raises:
        ParityFailure: no candidate met the floor (nothing is written; the result is on the exception).
    """
    from diffship.reference.loader import load
    from diffship.reference.pipelines import specs_for_pipeline
    from diffship.workflows.export import default_profile, export_pipeline, is_export

    record = backends.get(backend)
    tried = candidates(backend)
    if only:
        if unknown := sorted(set(only) - {c.name for c in tried}):
            raise DiffshipError(f"unknown candidate(s) {', '.join(unknown)}; {backend} here has: "
                                f"{', '.join(c.name for c in tried)}")
        tried = [c for c in tried if c.name in only]
    record.require(runtime=True)
    out = Path(out)
    check_destination(out, overwrite, is_export, "diffship export")
    given = _given_exports(exports or {}, backend)
    say = progress or (lambda _: None)
    say(f"loading {source}")
    pipe = load(source)
    pipe.set_progress_bar_config(disable=True)
    profile = default_profile(pipe, size=size)
    request = ParitySettings(steps=steps, height=profile.height, width=profile.width)
    init = synthetic_image(profile.height, profile.width)
    denoiser = next(s for s in specs_for_pipeline(pipe) if s.denoiser)
    say(f"eager fp32: {profile.height}x{profile.width}, {steps} steps, {repeats} timed runs")
    with record_calls(pipe, [denoiser], limit=4) as calls:
        expected, eager_seconds = _timed(lambda: generate_images(pipe, request, "text2img", init, 1), repeats)
    eager_module = getattr(pipe, denoiser.source)
    eager_outputs = [denoiser.eager(eager_module)(c) for c in calls[denoiser.name]]

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tune-", dir=out.parent if out.parent.exists() else None))
    trials: list[Trial] = []
    folders: dict[str, Path] = dict(given)
    started = time.perf_counter()

    def trial_of(cand: Candidate) -> None:
        trial = Trial(cand)
        trials.append(trial)
        try:
            if cand.precision not in folders:
                start = time.perf_counter()
                export_pipeline(source, work / cand.precision, backend=backend, precision=cand.precision,
                                runtime=cand.runtime, calibration_size=(profile.height, profile.width),
                                calibration_steps=steps)
                trial.export_seconds = time.perf_counter() - start
                folders[cand.precision] = work / cand.precision
            _measure(trial, folders[cand.precision], request, init, repeats, expected,
                     denoiser, calls[denoiser.name], eager_outputs)
        except DiffshipError as exc:
            trial.error = str(exc)

    def fastest() -> Trial | None:
        passing = [t for t in trials if t.meets(min_psnr)]
        return min(passing, key=lambda t: t.seconds) if passing else None

    try:
        for i, cand in enumerate(tried):
            left = "" if not i else f", about {(time.perf_counter() - started) / i * (len(tried) - i):.0f} s left"
            say(f"candidate {i + 1} of {len(tried)}: {cand.name}{left}")
            trial_of(cand)
        mode = fastest()
        variants = setting_variants(backend, mode.candidate) if mode else []
        for i, cand in enumerate(variants):
            say(f"runtime settings {i + 1} of {len(variants)}: {cand.name}, about "
                f"{max(1, round(mode.seconds * (repeats + 1) * (len(variants) - i)))} s left")
            trial_of(cand)
        best = fastest()
        result = TuneResult(backend=backend, source=str(source), min_psnr=min_psnr,
                            settings={"height": profile.height, "width": profile.width, "steps": steps,
                                      "repeats": repeats, "prompt": request.prompt, "seed": request.seed,
                                      "guidance_scale": request.guidance_scale},
                            eager_seconds=eager_seconds, trials=trials, chosen=best and best.candidate.name,
                            machine=machine_info(record.versions()))
        if best is None:
            failure = ParityFailure(f"no {backend} mode reached {min_psnr:g} dB image PSNR against eager fp32 "
                                    f"(best: {max((t.image_psnr or -math.inf) for t in trials):.1f} dB); nothing "
                                    f"written: lower --min-psnr or try another backend")
            failure.result = result  # the table, for the command line to print
            raise failure
        _write(result, best, folders[best.candidate.precision], out, overwrite, record,
               keep=best.candidate.precision in given)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _given_exports(exports: Mapping[str, str | Path], backend: str) -> dict[str, Path]:
    """The existing exports by precision, each checked against its manifest (the backend and precision it
    was given for); :class:`DiffshipError` otherwise."""
    out = {}
    for precision, folder in exports.items():
        manifest = read_manifest(folder, verify=False)
        if (manifest.backend, manifest.precision) != (backend, precision):
            raise DiffshipError(f"{folder} is a {manifest.backend} {manifest.precision} export, not {backend} "
                                f"{precision}; give tune exports of the backend it tunes")
        out[precision] = Path(folder)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the disk allows (an export of gigabytes, not written twice), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _measure(trial: Trial, folder: Path, request: ParitySettings, init: np.ndarray, repeats: int,
             expected: np.ndarray, denoiser: Any, calls: list[dict], eager_outputs: list[dict]) -> None:
    """Run one candidate: its image's time and PSNR, its denoiser's PSNR on the recorded calls."""
    from diffship.runtimes.pipeline import open_export

    with open_export(folder, check_finite=False, **trial.candidate.runtime) as loaded:
        loaded.pipeline.set_progress_bar_config(disable=True)
        image, trial.seconds = _timed(lambda: generate_images(loaded.pipeline, request, "text2img", init, 1), repeats)
        trial.image_psnr = image_metrics(expected[0], image[0]).psnr
        runner = loaded.runners[denoiser.name]
        got = [runner.infer(c) for c in calls]
        pairs = [(e[n].float().numpy().ravel(), g[n].float().cpu().numpy().ravel())
                 for e, g in zip(eager_outputs, got) for n in denoiser.output_names]
        trial.denoiser_psnr = tensor_metrics(np.concatenate([p[0] for p in pairs]),
                                             np.concatenate([p[1] for p in pairs])).psnr


def _write(result: TuneResult, best: Trial, folder: Path, out: Path, overwrite: bool, record: Any,
           keep: bool) -> None:
    """Move (with ``keep``: copy) the chosen export to ``out`` with its settings in the manifest and the
    table beside it."""
    from diffship.workflows.export import is_export

    manifest = read_manifest(folder, verify=False)
    with atomic_folder(out, overwrite=overwrite, replaceable=is_export, what="diffship export") as tmp:
        for item in folder.iterdir():
            if not keep:
                shutil.move(str(item), tmp / item.name)
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy)
            elif item.name != MANIFEST:  # written below: a link would rewrite the original's too
                _link_or_copy(str(item), str(tmp / item.name))
        atomic_write(tmp / TABLE_JSON, json.dumps(result.to_dict(), indent=2) + "\n")
        atomic_write(tmp / TABLE_MD, result.markdown())
        replace(manifest, runtime=record.runtime_settings(best.candidate.runtime)).write(tmp)

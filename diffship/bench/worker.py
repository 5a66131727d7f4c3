"""One benchmark subject (eager PyTorch at a precision, or one export) served from its own process.

Each subject lives in a separate process so its peak memory is its own (``ru_maxrss``), a crash or an
out-of-memory kill costs only that subject, and subjects cannot share caches or thread pools. The
coordinator asks the subjects for one timed call at a time, in turn, so every subject sees the same
machine conditions (interleaved repetitions); all timing happens inside the subject.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from diffship.errors import DiffshipError, first_line


@dataclass(frozen=True)
class Subject:
    """What is benchmarked in one worker.

    Attributes:
        name: ``torch-fp32``, ``onnx-fp16``, ...
        backend: ``torch`` or an export backend.
        precision: eager dtype or export precision.
        folder: the export folder (None for eager PyTorch).
        options: runner options (exports) -- see ``diffship.load_pipeline``.
    """

    name: str
    backend: str
    precision: str
    folder: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


class _State:
    """The loaded pipeline and how to call each of its components directly."""

    def __init__(self, subject: Subject, settings: dict[str, Any]):
        import torch

        from diffship.reference.pipelines import specs_for_pipeline

        self.subject = subject
        self.device = torch.device(settings["device"] if subject.backend == "torch" else "cpu")
        self.runners = None
        start = time.perf_counter()
        if subject.backend == "torch":
            from diffship.reference import load_with_info
            from diffship.reference.shapes import PRECISIONS

            if settings.get("threads"):
                torch.set_num_threads(settings["threads"])
            self.pipe, info = load_with_info(settings["source"])
            self.dtype = PRECISIONS[subject.precision]
            self.pipe.to(self.device, self.dtype)
            self.source = info.to_dict()
            self.runtime = f"PyTorch {torch.__version__} eager ({self.device.type}, {subject.precision})"
            self.compute = subject.precision
        else:
            from diffship.runtimes.pipeline import open_export

            # Raw speed, as eager PyTorch runs: NaN shows in the parity figures next to the timings.
            # A folder without configs (Apple's) takes them from the run's source.
            loaded = open_export(subject.folder, check_finite=False, source=settings["source"], **subject.options)
            self.pipe, self.runners = loaded.pipeline, loaded.runners
            self.dtype = torch.float32  # adapters take and return float32; runners cast
            self.source = loaded.manifest.source.to_dict()
            # e.g. "onnxruntime 1.32 (CPUExecutionProvider)", "MIL reference (Linux)" for Core ML here
            self.runtime = f"{loaded.unet_runner().describe()}; {loaded.describe_settings()}"
            self.compute = _compute(loaded)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - start
        self.specs = {s.name: s for s in specs_for_pipeline(self.pipe)}
        self.default_scheduler = self.pipe.scheduler

    def sync(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def _callable(self, name: str, profile: dict[str, Any]):
        """The component as a function of its spec-named inputs, and those inputs for ``profile``."""
        from diffship.reference.shapes import ShapeProfile

        spec = self.specs[name]
        inputs = spec.example_inputs(ShapeProfile(**profile))
        if self.runners is not None:
            if name not in self.runners:
                raise DiffshipError(f"{name} was not exported")
            return self.runners[name].infer, inputs
        inputs = {k: v.to(self.device, self.dtype if v.is_floating_point() and k != "timestep" else v.dtype)
                  for k, v in inputs.items()}
        return spec.eager(getattr(self.pipe, spec.source)), inputs

    def flops(self, name: str, profile: dict[str, Any]) -> int:
        """FLOPs of one eager call (torch's FlopCounterMode); eager subjects only."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        if self.runners is not None:
            raise DiffshipError("FLOPs are counted on eager PyTorch")
        call, inputs = self._callable(name, profile)
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            call(inputs)
        return int(counter.get_total_flops())

    def component(self, name: str, profile: dict[str, Any], calls: int, keep: bool) -> dict[str, Any]:
        """Time ``calls`` calls of one component on the seeded example inputs of ``profile``."""
        import torch

        call, inputs = self._callable(name, profile)
        seconds = []
        with torch.inference_mode():
            for _ in range(calls):
                start = time.perf_counter()
                outputs = call(inputs)
                self.sync()
                seconds.append(time.perf_counter() - start)
        result: dict[str, Any] = {"seconds": seconds}
        if keep:
            result["outputs"] = {k: v.float().cpu().numpy() for k, v in outputs.items()}
        return result

    @contextlib.contextmanager
    def _timing(self, spent: dict[str, float]) -> Iterator[None]:
        """Adds each component's call times to ``spent`` during the block: an export's runners (whose
        adapters the pipeline calls) or the eager modules' methods, shadowed on the instances."""
        from diffship.reference.recording import shadowing

        def timing(name: str, original: Callable) -> Callable:
            def timed(*args, **kwargs):
                begin = time.perf_counter()
                out = original(*args, **kwargs)
                self.sync()
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - begin
                return out
            return timed

        if self.runners is None:
            with shadowing(self.pipe, list(self.specs.values()), lambda spec, original: timing(spec.name, original)):
                yield
            return
        for name, runner in self.runners.items():
            runner.infer = timing(name, runner.infer)
        try:
            yield
        finally:
            for runner in self.runners.values():
                del runner.infer

    def pipeline(self, request: dict[str, Any], keep: bool) -> dict[str, Any]:
        """One timed end-to-end generation; per-iteration times from ``callback_on_step_end``."""
        import torch

        from diffship.reference.pipelines import scheduler_class

        name = request["scheduler"]
        base = self.default_scheduler
        self.pipe.scheduler = base if name == "default" else scheduler_class(self.pipe, name).from_config(base.config)
        marks: list[float] = []

        def on_step(pipe, step, timestep, kwargs):
            self.sync()
            marks.append(time.perf_counter())
            return kwargs

        spent: dict[str, float] = {}
        start = time.perf_counter()
        with torch.inference_mode(), self._timing(spent):
            images = self.pipe(
                [request["prompt"]] * request["batch"], height=request["height"], width=request["width"],
                num_inference_steps=request["steps"], guidance_scale=request["guidance_scale"],
                generator=torch.Generator().manual_seed(request["seed"]), output_type="np",
                callback_on_step_end=on_step,
            ).images
        self.sync()
        total = time.perf_counter() - start
        result: dict[str, Any] = {
            "seconds": total,
            "step_seconds": list(np.diff(marks)) if len(marks) > 1 else [],
            # The denoising loop calls the UNet once per iteration; second-order schedulers (Heun)
            # iterate twice per step.
            "unet_calls": len(marks),
            # each component's share of this run: all its calls, timed where the pipeline makes them
            "component_seconds": spent,
            "scheduler_class": type(self.pipe.scheduler).__name__,
        }
        if keep:
            result["image"] = np.asarray(images[0], dtype=np.float32)
        return result

    def memory(self) -> dict[str, Any]:
        import torch

        from diffship.bench.machine import current_rss_bytes, peak_rss_bytes

        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return {"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes(), "peak_gpu_bytes": gpu}


def _compute(loaded: Any) -> str:
    """What an export's denoiser computes its products in (``int8`` for full int8, whose activations are
    8-bit too; else the runner's reduced compute or the export's float precision: 8- and 4-bit weight
    formats compute in fp32), so its rate is put against that dtype's measured peak."""
    from diffship import backends
    from diffship.backends.quantized import FULL_INT8

    manifest = loaded.manifest
    if manifest.precision == FULL_INT8:
        return "int8"
    compute = loaded.unet_runner().compute_precision or backends.get(manifest.backend).compute_precision(manifest.precision)
    return compute if compute in ("fp32", "bf16", "fp16") else "fp32"  # 8/4-bit weights compute in float


def serve(conn: Any, subject: Subject, settings: dict[str, Any]) -> None:
    """Worker main loop: load, report, then answer requests until told to stop.

    Replies are ``("ok", value)``, ``("skip", reason)`` for requests this subject cannot serve (a shape
    a fixed-shape export does not take) or ``("error", message)``.
    """
    import logging
    import os
    import signal
    import warnings

    # Ctrl-C reaches the whole process group: the coordinator handles it and stops the workers in turn.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        state = _State(subject, settings)
    except Exception as exc:  # reported to the coordinator, which drops this subject
        conn.send((0, "error", f"loading failed: {type(exc).__name__}: {first_line(exc)}"))
        return
    from diffship.bench.machine import current_rss_bytes

    conn.send((0, "ok", {"load_seconds": state.load_seconds, "rss_bytes": current_rss_bytes(),
                         "source": state.source, "components": list(state.specs), "runtime": state.runtime,
                         "compute": state.compute}))
    while True:
        number, kind, *args = conn.recv()
        if kind == "stop":
            conn.send((number, "ok", state.memory()))
            return
        try:
            conn.send((number, "ok", getattr(state, kind)(*args)))
        except DiffshipError as exc:
            conn.send((number, "skip", first_line(exc)))
        except Exception as exc:  # one failed measurement must not end the run
            conn.send((number, "error", f"{type(exc).__name__}: {first_line(exc)}"))

"""TensorRT runtime: each component's engine on an NVIDIA GPU, fed and read as torch CUDA tensors.

Inputs and outputs stay on the GPU: the runner reports its CUDA device to the pipeline adapters, so
diffusers creates latents there and nothing goes through the host between denoising steps. The
optimization profile is chosen per call from the input shapes; a shape outside every profile is
refused with the sizes the engine takes. Before anything is deserialized the manifest's record of the
engine (flavour, version, target GPUs) is checked against this machine, so a mismatched engine is
refused with a message saying what to rebuild, instead of failing inside TensorRT.

Options: ``device`` (``cuda`` or ``cuda:N``), ``cuda_graph`` (replay a captured CUDA graph per shape:
standard TensorRT captures static-shape profiles through torch, TensorRT-RTX uses its own
whole-graph capture), ``runtime_cache`` (TensorRT-RTX: a folder keeping, per component, the kernels it
compiles on the GPU, so later loads skip the compilation; saved when the runner closes).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffship._files import atomic_write
from diffship.backends.manifest import ComponentEntry
from diffship.backends.tensorrt import (FLAVOURS, EngineProfile, TensorRTRuntimeOptions, check_engine,
                                        installed_versions)
from diffship.errors import ExportedModelError, OptionError, RuntimeFailure, ShapeError
from diffship.reference.shapes import TORCH_DTYPES
from diffship.runtimes.base import Runner

log = logging.getLogger("diffship")


def select_profile(profiles: list[EngineProfile], shapes: dict[str, tuple[int, ...]], component: str) -> int:
    """The first optimization profile whose [min, max] ranges hold every input shape.

    Raises:
        ShapeError: no profile does; the message gives the request sizes each profile takes.
    """
    for index, profile in enumerate(profiles):
        if all(all(lo <= s <= hi for lo, s, hi in zip(r.min, shapes[n], r.max))
               for n, r in profile.inputs.items()):
            return index
    takes = "; ".join(_profile_text(p) for p in profiles)
    got = ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
    raise ShapeError(f"{component}: {got} is outside the engine's optimization profiles, which take {takes}; "
                     f"re-export with -o profile=... covering this size (e.g. -o profile=dynamic)")


def graph_capture_problem(rtx: bool, profile: EngineProfile) -> str | None:
    """Why a CUDA graph is not captured through torch for calls in ``profile``, or None when it is.

    TensorRT-RTX captures graphs itself (its runtime config). Standard TensorRT is captured only for a
    fixed-shape profile: a context that has run other shapes may have moved its scratch memory, which a
    graph captured earlier would still point at.
    """
    if rtx:
        return "TensorRT-RTX captures its own graphs"
    if not all(r.min == r.max for r in profile.inputs.values()):
        return (f"the engine's profile for {profile.request.describe()} takes a range of shapes, and standard "
                f"TensorRT is captured only for fixed-shape profiles (export with --static or -o profile=static)")
    return None


def runtime_cache_file(folder: Path, component: str, engine: str) -> Path:
    """The TensorRT-RTX runtime-cache file of one component in the ``runtime_cache`` folder: one file per
    component and engine, so the runners of a pipeline never overwrite each other's cache.

    Raises:
        OptionError: ``folder`` is an existing file (it names a folder).
    """
    if folder.is_file():
        raise OptionError(f"tensorrt runtime option runtime_cache names a folder (one cache file per component is "
                          f"kept there), but {folder} is a file; give a folder")
    return folder / f"{component}.{Path(engine).stem}.rtcache"


def _profile_text(profile: EngineProfile) -> str:
    inputs = ", ".join(f"{n} {tuple(r.min)}..{tuple(r.max)}" for n, r in profile.inputs.items())
    return f"{profile.request.describe()} ({inputs})"


class TrtRunner(Runner):
    """One deserialized engine per component, with one execution context per optimization profile used.

    A context per profile (created on first use, its profile set once) avoids switching profiles on a
    shared context, which would invalidate captured CUDA graphs; usually only one profile is used.

    Options (:class:`TensorRTRuntimeOptions`): ``device``; ``cuda_graph`` replays captured CUDA graphs (see
    the module docstring), inputs and outputs then going through fixed buffers per shape, as graph replay
    needs stable addresses; ``runtime_cache``, a folder of TensorRT-RTX runtime caches (one file per
    component, :func:`runtime_cache_file`), loaded if present and
    saved by :meth:`close` (a loaded pipeline closes its runners when it is collected, or at exit).
    """

    def __init__(self, folder: Path, entry: ComponentEntry, options: TensorRTRuntimeOptions):
        super().__init__(folder, entry, options)
        details = self.details
        self.device = torch.device(options.device)
        if self.device.type != "cuda":
            raise RuntimeFailure(f"the tensorrt runtime runs on CUDA devices, not {options.device!r}; use device=cuda")
        check_engine(details, installed_versions(), torch.cuda.get_device_capability(self.device))
        if details.engine not in entry.files:  # the manifest's file list is what was verified
            raise ExportedModelError(f"{folder}: the engine {details.engine!r} is not among the component's files; "
                                     f"re-export")
        path = Path(folder) / details.engine
        if not path.is_file():
            raise ExportedModelError(f"{path} is missing; re-run diffship export")
        trt = self._trt = importlib.import_module(details.flavour)
        self._rtx = details.flavour == "tensorrt_rtx"
        self.cuda_graph = options.cuda_graph
        self._runtime_cache_path = (runtime_cache_file(Path(options.runtime_cache), self.name, details.engine)
                                    if options.runtime_cache else None)
        self._runtime_cache = None
        blob = path.read_bytes()
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
            self._check_validity(blob)
            self.engine = self._runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise RuntimeFailure(f"TensorRT could not load {path}; re-run with --debug, or re-export")
            self._check_io()
            self._runtime_config = self._make_runtime_config()
            self.stream = torch.cuda.Stream(self.device)
        self._contexts: dict[int, Any] = {}
        #: per (profile, input shapes) with cuda_graph: (graph or None, input buffers, output buffers)
        self._static: dict[tuple, tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self._said: set[str] = set()

    def _check_validity(self, blob: bytes) -> None:
        """TensorRT's own header check, where the flavour has it, for what the manifest cannot know."""
        trt = self._trt
        if not hasattr(self._runtime, "get_engine_validity"):  # standard TensorRT 10 has no such check
            return
        validity, diagnostics = self._runtime.get_engine_validity(blob[: self._runtime.engine_header_size])
        reasons = [n for n, flag in trt.EngineInvalidityDiagnostics.__members__.items()
                   if int(diagnostics) & int(flag)] or ["no reason given"]
        if validity == trt.EngineValidity.INVALID:
            raise ExportedModelError(f"TensorRT refuses {self.details.engine} here ({', '.join(reasons)}); "
                                     f"re-export it with diffship export ... --backend tensorrt")
        if validity == trt.EngineValidity.SUBOPTIMAL:
            log.warning("%s runs on this GPU but not at its best (%s); re-export it here for full speed",
                        self.details.engine, ", ".join(reasons))

    def _check_io(self) -> None:
        """The engine's IO tensors are the manifest's, with the same dtypes."""
        trt = self._trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        want = {io.name: io.dtype for io in (*self.inputs, *self.outputs)}
        if sorted(names) != sorted(want):
            raise ExportedModelError(f"{self.details.engine} has IO {names}, the manifest {sorted(want)}; re-export")
        for name in names:
            got = str(trt.nptype(self.engine.get_tensor_dtype(name)).__name__) if \
                self.engine.get_tensor_dtype(name) != trt.DataType.BF16 else "bfloat16"
            if got != want[name]:
                raise ExportedModelError(f"{self.details.engine}: {name} is {got} in the engine but {want[name]} in "
                                         f"the manifest; re-export")

    def _make_runtime_config(self):
        """TensorRT-RTX: CUDA-graph strategy and runtime cache (kept alive with the runner)."""
        if not self._rtx:
            return None
        config = self.engine.create_runtime_config()
        if self.cuda_graph:
            config.cuda_graph_strategy = self._trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        if self._runtime_cache_path:
            # Compile shape-specialised kernels up front, so the saved cache holds them (not fallbacks).
            config.dynamic_shapes_kernel_specialization_strategy = \
                self._trt.DynamicShapesKernelSpecializationStrategy.EAGER
            self._runtime_cache = config.create_runtime_cache()
            if self._runtime_cache_path.is_file() and not self._runtime_cache.deserialize(
                    self._runtime_cache_path.read_bytes()):
                log.warning("%s does not fit this TensorRT-RTX, GPU or driver; starting a fresh runtime cache",
                            self._runtime_cache_path)
            config.set_runtime_cache(self._runtime_cache)
        return config

    def _context(self, profile: int):
        if profile not in self._contexts:
            context = (self.engine.create_execution_context(self._runtime_config) if self._rtx
                       else self.engine.create_execution_context())
            if context is None:
                raise RuntimeFailure(f"TensorRT could not create an execution context for {self.name} (out of GPU "
                                     f"memory?)")
            if not context.set_optimization_profile_async(profile, self.stream.cuda_stream):
                raise RuntimeFailure(f"TensorRT could not select optimization profile {profile} of {self.name}")
            self._contexts[profile] = context
        return self._contexts[profile]

    def _convert(self, value: torch.Tensor | np.ndarray, dtype: str) -> torch.Tensor:
        return torch.as_tensor(value).to(device=self.device, dtype=TORCH_DTYPES[dtype]).contiguous()

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {n: tuple(t.shape) for n, t in feeds.items()}
        profile = select_profile(self.details.profiles, shapes, self.name)
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)  # inputs were produced on the caller's stream
            for t in feeds.values():
                t.record_stream(self.stream)  # ... and must outlive the engine's use of them
            context = self._context(profile)
            if self.cuda_graph:
                static_out = self._replay(context, (profile, *shapes.values()), feeds)
                current.wait_stream(self.stream)
                return {n: t.clone() for n, t in static_out.items()}  # on the caller's stream
            outputs = self._enqueue(context, feeds)
            current.wait_stream(self.stream)
            return outputs

    def _bind(self, context, feeds: dict[str, torch.Tensor],
              outputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Set input shapes and addresses; bind ``outputs``, or new ones of the shapes TensorRT infers."""
        for name, tensor in feeds.items():
            if not context.set_input_shape(name, tuple(tensor.shape)) or \
                    not context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeFailure(f"TensorRT refused {self.name} input {name} of shape {tuple(tensor.shape)}")
        if outputs is not None:
            for name, tensor in outputs.items():
                context.set_tensor_address(name, tensor.data_ptr())
            return outputs
        outputs = {}
        for spec in self.outputs:
            shape = tuple(context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise RuntimeFailure(f"TensorRT could not infer the shape of {self.name} output {spec.name}")
            with torch.cuda.stream(self.stream):
                outputs[spec.name] = torch.empty(shape, dtype=TORCH_DTYPES[spec.dtype], device=self.device)
            context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
        return outputs

    def _enqueue(self, context, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self._bind(context, feeds)
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeFailure(f"TensorRT failed to run {self.name} on "
                                 f"{', '.join(f'{n} {tuple(t.shape)}' for n, t in feeds.items())}")
        for t in outputs.values():
            t.record_stream(torch.cuda.current_stream(self.device))  # read by the caller after its wait
        return outputs

    def _replay(self, context, key: tuple, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CUDA graphs: fixed input/output buffers per shape. Standard TensorRT with a fixed-shape profile:
        bind them, warm up once (TensorRT finishes lazy set-up outside capture), capture one enqueue
        through torch, then copy in and replay. TensorRT-RTX captures by itself (its runtime config),
        given stable addresses. Every copy, launch and replay goes on the runner's stream, in order (the
        caller's stream was made to wait for the inputs in :meth:`_run`; it waits for the outputs after)."""
        with torch.cuda.stream(self.stream):
            if key not in self._static:
                static_in = {n: torch.empty_like(t) for n, t in feeds.items()}
                for n, t in feeds.items():
                    static_in[n].copy_(t)
                static_out = self._enqueue(context, static_in)  # binds the buffers and warms up
                self._static[key] = (self._capture(context, key[0]), static_in, static_out)
                return static_out
            graph, static_in, static_out = self._static[key]
            for n, t in feeds.items():
                static_in[n].copy_(t)
            if graph is not None:  # a fixed-shape profile: this context only ever ran these buffers
                graph.replay()
            else:  # the context may have run other shapes since: point it back at this shape's buffers
                self._bind(context, static_in, static_out)
                if not context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeFailure(f"TensorRT failed to run {self.name}")
            return static_out

    def _capture(self, context, profile: int):
        """A CUDA graph of one enqueue on ``context``, or None where graphs do not apply (said once)."""
        reason = graph_capture_problem(self._rtx, self.details.profiles[profile])
        if reason is None and not context.is_stream_capturable(self.stream.cuda_stream):
            reason = "TensorRT reports the stream cannot be captured"
        if reason:
            if reason not in self._said:
                self._said.add(reason)
                log.warning("%s: cuda_graph: %s; these calls run without a CUDA graph", self.name, reason)
            return None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeFailure(f"TensorRT could not be captured in a CUDA graph for {self.name}")
        return graph

    def close(self) -> None:
        """Save the TensorRT-RTX runtime cache (so the next load skips kernel compilation) and release the
        engine, its contexts and buffers."""
        if self.closed:
            return
        if self._runtime_cache is not None and self._runtime_cache_path:
            torch.cuda.synchronize(self.device)
            atomic_write(self._runtime_cache_path, memoryview(self._runtime_cache.serialize()))
        self._static.clear()
        self._contexts.clear()
        self.engine = None
        super().close()

    def describe(self) -> str:
        flavour = FLAVOURS[self.details.flavour]
        return f"{flavour} {self.details.tensorrt_version} ({torch.cuda.get_device_name(self.device)})"

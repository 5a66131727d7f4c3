"""TensorRT runtime: each component's engine on an NVIDIA GPU, fed and read as torch CUDA tensors.

Inputs and outputs stay on the GPU: the runner reports its CUDA device to the pipeline adapters, so
diffusers creates latents there and nothing goes through the host between denoising steps. The
optimization profile is chosen per call from the input shapes; a shape outside every profile is
refused with the sizes the engine takes. Before anything is deserialized the manifest's record of the
engine (flavour, version, target GPUs) is checked against this machine, so a mismatched engine is
refused with a message saying what to rebuild, instead of failing inside TensorRT.

Options: ``device`` (``cuda`` or ``cuda:N``), ``cuda_graph`` (replay a captured CUDA graph per shape:
standard TensorRT captures static-shape profiles through torch, TensorRT-RTX uses its own
whole-graph capture), ``runtime_cache`` (TensorRT-RTX: file that keeps the kernels it compiles on
the GPU, so later loads skip the compilation).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffship._files import atomic_write
from diffship._registry import require_modules
from diffship.errors import ExportedModelError, RuntimeFailure, ShapeError, UnavailableRuntimeError
from diffship.reference.specs import TORCH_DTYPES, ShapeRange
from diffship.runtimes.base import Runner, check_options

BACKENDS = ("tensorrt",)
EXTRA = "tensorrt"
PACKAGES = ("tensorrt|tensorrt_rtx",)
FLAVOUR_NAMES = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}


def check_platform() -> None:
    """Engines run only on an NVIDIA GPU that torch can use."""
    if not torch.cuda.is_available():
        raise UnavailableRuntimeError(
            f"the tensorrt runtime needs an NVIDIA GPU with CUDA, and torch {torch.__version__} sees none here; "
            f"engines still build on this machine (TensorRT-RTX): run them where a GPU is"
        )


def check_engine(details: dict[str, Any], installed: dict[str, str], capability: tuple[int, int] | None) -> None:
    """Refuse an engine this machine cannot run, from its manifest record alone.

    Args:
        details: the component's manifest ``details`` written by the tensorrt exporter.
        installed: TensorRT flavour module -> version installed here.
        capability: the GPU's compute capability (major, minor), or None when unknown.

    Raises:
        ExportedModelError: the flavour is missing, the version differs (engines only load in the
            TensorRT build that made them), or the GPU is not among the engine's targets.
    """
    flavour, version = details["flavour"], details["tensorrt_version"]
    name = FLAVOUR_NAMES.get(flavour, flavour)
    rebuild = "re-export it here with: diffship export SOURCE OUT --backend tensorrt"
    if flavour not in installed:
        have = ", ".join(f"{FLAVOUR_NAMES[f]} {v}" for f, v in installed.items()) or "no TensorRT"
        raise ExportedModelError(f"engine {details['engine']} was built with {name} {version}, but this machine has "
                                 f"{have}; install {name} {version}, or {rebuild}")
    if installed[flavour] != version:
        raise ExportedModelError(f"engine {details['engine']} was built with {name} {version}, but {name} "
                                 f"{installed[flavour]} is installed (engines load only in the version that built "
                                 f"them); install {version}, or {rebuild}")
    if capability is None:
        return
    sm = f"sm{capability[0]}{capability[1]}"
    targets = details["compute_capability"]["targets"]
    ok = (sm in targets if isinstance(targets, list)
          else capability >= (8, 0) if targets in ("portable", "ampere+") else True)
    if not ok:
        wanted = ", ".join(targets) if isinstance(targets, list) else f"{targets} (Ampere, sm80, and later)"
        raise ExportedModelError(f"engine {details['engine']} targets {wanted}, but this GPU is {sm}; {rebuild}"
                                 + (f" -o compute_capability={sm}" if flavour == "tensorrt_rtx" else ""))


def select_profile(profiles: list[dict[str, Any]], shapes: dict[str, tuple[int, ...]], component: str) -> int:
    """The first optimization profile whose [min, max] ranges hold every input shape.

    Raises:
        ShapeError: no profile does; the message gives the request sizes each profile takes.
    """
    for index, profile in enumerate(profiles):
        if all(all(lo <= s <= hi for lo, s, hi in zip(r["min"], shapes[n], r["max"]))
               for n, r in profile["inputs"].items()):
            return index
    takes = "; ".join(_profile_text(p) for p in profiles)
    got = ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
    raise ShapeError(f"{component}: {got} is outside the engine's optimization profiles, which take {takes}; "
                     f"re-export with -o profile=... covering this size (e.g. -o profile=dynamic)")


def _profile_text(profile: dict[str, Any]) -> str:
    request = ShapeRange.from_dict(profile["request"])
    inputs = ", ".join(f"{n} {tuple(r['min'])}..{tuple(r['max'])}" for n, r in profile["inputs"].items())
    return f"{request.describe()} ({inputs})"


def installed_versions() -> dict[str, str]:
    return {f: importlib.import_module(f).__version__ for f in FLAVOUR_NAMES if importlib.util.find_spec(f)}


class TrtRunner(Runner):
    """One deserialized engine and execution context per component.

    Args:
        folder: the component folder holding the engine.
        component: the component's manifest entry.
        device: the CUDA device (``cuda``, ``cuda:1``).
        cuda_graph: replay captured CUDA graphs (see the module docstring).
        runtime_cache: TensorRT-RTX runtime-cache file, loaded if present and saved after each new shape.
    """

    def __init__(self, folder: Path, component: dict[str, Any], device: str = "cuda", cuda_graph: bool = False,
                 runtime_cache: str | None = None):
        super().__init__(component["component"], component["inputs"], component["outputs"])
        self.details = details = component["details"]
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RuntimeFailure(f"the tensorrt runtime runs on CUDA devices, not {device!r}; use device=cuda")
        check_engine(details, installed_versions(), torch.cuda.get_device_capability(self.device))
        path = Path(folder) / details["engine"]
        if not path.is_file():
            raise ExportedModelError(f"{path} is missing; re-run diffship export")
        trt = self._trt = importlib.import_module(details["flavour"])
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._rtx = details["flavour"] == "tensorrt_rtx"
        blob = path.read_bytes()
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(self._logger)
            self._check_validity(runtime, blob)
            self.engine = runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise RuntimeFailure(f"TensorRT could not load {path}; re-run with --debug, or re-export")
            self._runtime_cache_path = Path(runtime_cache) if runtime_cache else None
            self.context = self._create_context(cuda_graph)
            self.stream = torch.cuda.Stream(self.device)
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self._profile = -1
        self._seen: set[tuple] = set()

    def _check_validity(self, runtime, blob: bytes) -> None:
        """TensorRT's own header check, where the flavour has it, for what the manifest cannot know."""
        if not hasattr(runtime, "get_engine_validity"):
            return
        validity, diagnostics = runtime.get_engine_validity(blob[: runtime.engine_header_size])
        if validity == self._trt.EngineValidity.INVALID:
            reasons = [n for n, flag in self._trt.EngineInvalidityDiagnostics.__members__.items()
                       if int(diagnostics) & int(flag)] or ["no reason given"]
            raise ExportedModelError(f"{self.details['engine']} cannot run on this GPU ({', '.join(reasons)}); "
                                     f"re-export it with diffship export ... --backend tensorrt")

    def _create_context(self, cuda_graph: bool):
        if not self._rtx:
            return self.engine.create_execution_context()
        config = self.engine.create_runtime_config()
        if cuda_graph:
            config.cuda_graph_strategy = self._trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        if self._runtime_cache_path:
            self._runtime_cache = config.create_runtime_cache()
            if self._runtime_cache_path.is_file():
                self._runtime_cache.deserialize(self._runtime_cache_path.read_bytes())
            config.set_runtime_cache(self._runtime_cache)
        return self.engine.create_execution_context(config)

    def _convert(self, value: torch.Tensor | np.ndarray, dtype: str) -> torch.Tensor:
        return torch.as_tensor(value).to(device=self.device, dtype=TORCH_DTYPES[dtype]).contiguous()

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {n: tuple(t.shape) for n, t in feeds.items()}
        profile = select_profile(self.details["profiles"], shapes, self.name)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # inputs were produced on the caller's stream
        if profile != self._profile:
            if not self.context.set_optimization_profile_async(profile, self.stream.cuda_stream):
                raise RuntimeFailure(f"TensorRT could not switch {self.name} to optimization profile {profile}")
            self._profile = profile
        key = (profile, *shapes.values())
        static = all(r["min"] == r["max"] for r in self.details["profiles"][profile]["inputs"].values())
        if self.cuda_graph and not self._rtx and static:
            outputs = self._graph_run(key, feeds)
        else:
            outputs = self._enqueue(feeds)
        for t in (*feeds.values(), *outputs.values()):
            t.record_stream(self.stream)  # the caching allocator must not reuse them before the engine is done
        current.wait_stream(self.stream)
        if key not in self._seen:
            self._seen.add(key)
            self._save_runtime_cache()  # TensorRT-RTX compiled kernels for a new shape
        return outputs

    def _bind(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Set input shapes and addresses; allocate and bind outputs of the shapes TensorRT infers."""
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for spec in self.outputs:
            shape = tuple(self.context.get_tensor_shape(spec["name"]))
            outputs[spec["name"]] = torch.empty(shape, dtype=TORCH_DTYPES[spec["dtype"]], device=self.device)
            self.context.set_tensor_address(spec["name"], outputs[spec["name"]].data_ptr())
        return outputs

    def _enqueue(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self._bind(feeds)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeFailure(f"TensorRT failed to run {self.name} on {', '.join(f'{n} {tuple(t.shape)}' for n, t in feeds.items())}")
        return outputs

    def _graph_run(self, key: tuple, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Static shapes: capture one enqueue into a CUDA graph on first use, then copy in and replay."""
        if key not in self._graphs:
            outputs = self._enqueue(feeds)  # warm-up: TensorRT finishes lazy initialisation outside capture
            static_in = {n: t.clone() for n, t in feeds.items()}
            with torch.cuda.stream(self.stream):
                static_out = self._bind(static_in)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.context.execute_async_v3(self.stream.cuda_stream)
            self._graphs[key] = (graph, static_in, static_out)
            return outputs
        graph, static_in, static_out = self._graphs[key]
        with torch.cuda.stream(self.stream):
            for name, tensor in feeds.items():
                static_in[name].copy_(tensor)
            graph.replay()
            return {n: t.clone() for n, t in static_out.items()}

    def _save_runtime_cache(self) -> None:
        """Save the TensorRT-RTX runtime cache, so the next load skips kernel compilation."""
        cache = getattr(self, "_runtime_cache", None)
        if cache is not None and self._runtime_cache_path:
            atomic_write(self._runtime_cache_path, memoryview(cache.serialize()))

    def describe(self) -> str:
        flavour = FLAVOUR_NAMES[self.details["flavour"]]
        return f"{flavour} {self.details['tensorrt_version']} ({torch.cuda.get_device_name(self.device)})"


def open_runner(folder: Path, component: dict[str, Any], options: dict[str, Any]) -> TrtRunner:
    require_modules(BACKENDS[0], EXTRA, *PACKAGES)
    check_platform()
    check_options(TrtRunner, options)
    return TrtRunner(folder, component, **options)

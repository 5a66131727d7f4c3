"""TensorRT: one engine per component, built from its ONNX export (standard TensorRT or TensorRT-RTX), run
on an NVIDIA GPU.

What the exporter and the runtime share lives here: the flavours and their installed versions, engine
file names, the options and manifest record, and the check that an engine can run on this machine.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from diffship.backends.base import Backend, Details
from diffship.backends.onnx import MIN_OPSET
from diffship.configs.fields import comma_list, option
from diffship.errors import ExportedModelError
from diffship.reference.shapes import ShapeRange, span

#: TensorRT flavours by module name, in order of preference.
FLAVOURS = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
ENGINE_SUFFIX = ".plan"
#: compute-capability targets each flavour builds for (``-o compute_capability=...``). TensorRT-RTX runs on
#: these GPUs only (its bindings know no others: not Volta, Hopper or data-center Blackwell); its default
#: ("portable") set is the Ampere-and-later part of it, Turing (sm75) only when named.
TARGETS = {"tensorrt_rtx": ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121"), "tensorrt": ("ampere+",)}
RTX_PORTABLE = ("sm80", "sm86", "sm89", "sm120", "sm121")


def installed_flavours() -> list[str]:
    """The TensorRT flavours importable here, standard TensorRT first."""
    return [f for f in FLAVOURS if importlib.util.find_spec(f) is not None]


def installed_versions() -> dict[str, str]:
    """Installed TensorRT flavour -> its version."""
    return {flavour: importlib.import_module(flavour).__version__ for flavour in installed_flavours()}


def _flavour_name(value: Any) -> Any:
    return str(value).replace("-", "_").lower() if value is not None else None


def _targets(value: Any) -> Any:
    values = comma_list(str(value) if isinstance(value, int) and not isinstance(value, bool) else value)
    return [str(v).replace(" ", "").lower() for v in values] if isinstance(values, (list, tuple)) else values


@dataclass(frozen=True)
class TensorRTExportOptions:
    """``-o`` options of a TensorRT export (see :mod:`diffship.exporters.tensorrt`).

    Attributes:
        profile: ``static``, a preset of ``configs/shape_profiles.toml`` (``dynamic``), or explicit ranges
            ``{"batch": [min, opt, max], "height": [...], "width": [...]}``, plus ``"text_sequence"`` (T5
            sequence lengths) for SD3 and Flux (or a list of them).
        flavour: ``tensorrt`` or ``tensorrt_rtx`` (default: whichever is installed, standard first).
        optimization_level: builder optimization level 0-5 (TensorRT's default 3).
        refit: build refittable engines.
        tf32: allow TF32 in fp32 engines.
        compute_capability: TensorRT-RTX target GPUs (``sm86,sm89``); standard TensorRT: ``ampere+``.
        timing_cache: timing-cache file, true (one per flavour, version and GPU in the diffship cache) or false.
        onnx_cache: keep the intermediate ONNX export in the diffship cache.
        onnx_cache_max_gb: the ONNX cache's size cap: after a new entry is written, the least recently used
            others are removed until the cache fits (0: no cap; ``diffship cache`` lists and prunes it).
        opset / external_data: of the intermediate ONNX export.
    """

    profile: Any = None
    flavour: str | None = option(None, choices=tuple(FLAVOURS), normalize=_flavour_name)
    optimization_level: int | None = option(None, minimum=0, maximum=5)
    refit: bool = False
    tf32: bool = False
    compute_capability: tuple[str, ...] = option((), normalize=_targets)
    timing_cache: str | bool = True
    onnx_cache: bool = True
    onnx_cache_max_gb: float = option(20.0, minimum=0)
    opset: int = option(18, minimum=MIN_OPSET)
    external_data: bool | None = None


@dataclass(frozen=True)
class TensorRTRuntimeOptions:
    """TensorRT runtime options.

    Attributes:
        device: the CUDA device (``cuda``, ``cuda:1``).
        cuda_graph: replay captured CUDA graphs.
        runtime_cache: a folder of TensorRT-RTX runtime caches, one file per component, loaded if present
            and saved when the runner closes.
    """

    device: str = "cuda"
    cuda_graph: bool = False
    runtime_cache: str | None = None


@dataclass(frozen=True)
class ProfileShapes:
    """(min, opt, max) shape of one engine input in one optimization profile."""

    min: list[int]
    opt: list[int]
    max: list[int]


@dataclass(frozen=True)
class EngineProfile:
    """One optimization profile: the request shapes it serves, and the input shapes TensorRT reports back."""

    request: ShapeRange
    inputs: dict[str, ProfileShapes]


@dataclass(kw_only=True)
class TensorRTDetails(Details):
    """What a TensorRT export records per component.

    Attributes:
        engine: the engine file name (see :func:`engine_name`).
        flavour / tensorrt_version: what built it (engines load only in the same).
        strongly_typed: the network computes in its ONNX graph's types.
        compute_capability: ``{"targets": "portable" | "ampere+" | ["sm86", ...], "note": ...}``.
        tf32 / optimization_level / refittable: builder settings as TensorRT reports them.
        profiles: the optimization profiles (:class:`EngineProfile`).
        timing_cache: where the timing cache was, and what was loaded and saved (or why it was not used).
        onnx: facts of the intermediate ONNX export (opset, cache use, seconds).
        timings: seconds of the ONNX export and the engine build.
        notes: one line each about the caches.
    """

    engine: str
    flavour: str
    tensorrt_version: str
    strongly_typed: bool
    compute_capability: dict[str, Any]
    tf32: bool
    profiles: list[EngineProfile]
    optimization_level: int
    refittable: bool
    timing_cache: dict[str, Any]
    onnx: dict[str, Any]
    timings: dict[str, float]
    notes: list[str]


def engine_name(precision: str, ranges: list[ShapeRange], flavour: str, version: str, target: str) -> str:
    """File name recording what the engine is: precision, profiles, flavour-version, target GPUs."""
    shapes = [f"b{span(r.batch)}_h{span(r.height)}_w{span(r.width)}"
              + (f"_t{span(r.text_sequence)}" if r.text_sequence is not None else "") for r in ranges]
    tag = "+".join(shapes) if len(shapes) <= 2 else \
        f"{len(shapes)}profiles-{hashlib.sha256('+'.join(shapes).encode()).hexdigest()[:8]}"
    short = {"tensorrt": "trt", "tensorrt_rtx": "trt-rtx"}[flavour]
    return f"{precision}.{tag}.{short}-{version}.{target}{ENGINE_SUFFIX}"


def target_tag(flavour: str, compute_capability: tuple[str, ...]) -> str:
    """``portable`` (TensorRT-RTX's default set), ``sm86-sm89``, ``ampere+``, or ``build-gpu``."""
    if not compute_capability:
        return "portable" if flavour == "tensorrt_rtx" else "build-gpu"
    return "-".join(compute_capability)


def cuda_unavailable() -> str | None:
    """Why engines cannot run here (torch sees no NVIDIA GPU), or None."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"the tensorrt runtime needs an NVIDIA GPU with CUDA, and torch {torch.__version__} sees none here; "
            f"engines still build on this machine (TensorRT-RTX): run them where a GPU is")


def check_engine(details: TensorRTDetails, installed: dict[str, str], capability: tuple[int, int] | None) -> None:
    """Refuse an engine this machine cannot run, from its manifest record alone.

    Args:
        details: the component's manifest details.
        installed: TensorRT flavour module -> version installed here.
        capability: the GPU's compute capability (major, minor), or None when unknown.

    Raises:
        ExportedModelError: the flavour is missing, the version differs (engines only load in the
            TensorRT build that made them), or the GPU is not among the engine's targets.
    """
    flavour, version = details.flavour, details.tensorrt_version
    name = FLAVOURS.get(flavour, flavour)
    rebuild = "re-export it here with: diffship export SOURCE OUT --backend tensorrt"
    if flavour not in installed:
        have = ", ".join(f"{FLAVOURS[f]} {v}" for f, v in installed.items()) or "no TensorRT"
        raise ExportedModelError(f"engine {details.engine} was built with {name} {version}, but this machine has "
                                 f"{have}; install {name} {version}, or {rebuild}")
    if installed[flavour] != version:
        raise ExportedModelError(f"engine {details.engine} was built with {name} {version}, but {name} "
                                 f"{installed[flavour]} is installed (engines load only in the version that built "
                                 f"them); install {version}, or {rebuild}")
    if capability is None:
        return
    sm = f"sm{capability[0]}{capability[1]}"
    if flavour == "tensorrt_rtx" and sm not in TARGETS["tensorrt_rtx"]:
        raise ExportedModelError(f"TensorRT-RTX does not run on this GPU ({sm}; it runs on "
                                 f"{', '.join(TARGETS['tensorrt_rtx'])}); use standard TensorRT here: install it from "
                                 f"NVIDIA's index (pip install tensorrt --extra-index-url https://pypi.nvidia.com) and "
                                 f"re-export with -o flavour=tensorrt")
    targets = details.compute_capability["targets"]
    ok = (sm in targets if isinstance(targets, list)
          else sm in RTX_PORTABLE if targets == "portable"
          else capability >= (8, 0) if targets == "ampere+" else True)
    if not ok:
        wanted = (", ".join(targets) if isinstance(targets, list) else
                  f"portable ({', '.join(RTX_PORTABLE)})" if targets == "portable" else f"{targets} (Ampere, sm80, and later)")
        raise ExportedModelError(f"engine {details.engine} targets {wanted}, but this GPU is {sm}; {rebuild}"
                                 + (f" -o compute_capability={sm}" if flavour == "tensorrt_rtx" else ""))


TENSORRT = Backend(
    name="tensorrt", extra="tensorrt", packages=("tensorrt|tensorrt_rtx", "onnx", "onnxscript"),
    runtime_packages=("tensorrt|tensorrt_rtx",), precisions=("fp32", "fp16", "bf16"),
    export_options=TensorRTExportOptions, runtime_options=TensorRTRuntimeOptions, details=TensorRTDetails,
    exporter="diffship.exporters.tensorrt", runner="diffship.runtimes.tensorrt:TrtRunner",
    runtime_unavailable=cuda_unavailable,
)

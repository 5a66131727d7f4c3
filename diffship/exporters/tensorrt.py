"""TensorRT exporter: one engine per component, built from the component's ONNX export in a child process.

Two TensorRT flavours build the same way through their Python APIs: standard TensorRT (``import
tensorrt``; building needs an NVIDIA GPU and the engine targets that GPU) and TensorRT-RTX (``import
tensorrt_rtx``; builds ahead of time on a CPU-only host, for a set of GPU architectures, and compiles
kernels on the GPU when the engine is loaded). Whichever is installed is used (standard first);
``-o flavour=...`` chooses.

Every network is *strongly typed*: an engine computes in the types of its ONNX graph, so ``fp16`` and
``bf16`` engines are built from an fp16/bf16 ONNX export (TensorRT-RTX has no precision builder flags
at all; bf16 graphs use ONNX opset 22, the first where convolutions take bfloat16). Components that overflow in reduced precision are exported in fp32 by the pipeline
orchestrator, as for every backend; fp32 engines are built without TF32 unless ``-o tf32=true``, so
they match eager fp32 PyTorch.

Layout per component: ``<component>/<engine name>.plan``. The name records precision, shape profiles,
flavour and version, and target compute capability
(``fp16.b1-4_h256-1024_w256-1024.trt-rtx-1.7.1.116.portable.plan``); the manifest records the same
facts, read back from the builder, so runtimes refuse a mismatched engine before loading it.

Options (``-o KEY=VALUE``):
    profile: ``static`` (the export's size and batch), a preset from ``configs/shape_profiles.toml``
        (``dynamic``, the default unless ``--static``), or explicit ``{"batch": [min, opt, max],
        "height": [...], "width": [...]}`` (and for SD3 and Flux ``"text_sequence": [...]``, the T5
        sequence lengths, ``max_sequence_length``; otherwise the pipeline's default only) -- or a list of
        those for several optimization profiles.
    flavour: ``tensorrt`` or ``tensorrt_rtx``.
    optimization_level: builder optimization level 0-5 (TensorRT's default 3).
    refit: build refittable engines (weights can be replaced without a rebuild). TensorRT-RTX 1.7
        builds these only on a machine with a GPU.
    tf32: allow TF32 in fp32 engines (faster on Ampere+, ~1e-3 relative error).
    compute_capability: TensorRT-RTX target GPUs, e.g. ``sm86,sm89`` (default: its portable set,
        Ampere and later; Turing, sm75, only when named); standard TensorRT: ``ampere+`` for a hardware-compatible engine
        (default: the building GPU only).
    timing_cache: timing-cache file to load and update (default: one per flavour and version in the
        diffship cache), or ``false``. TensorRT-RTX does not time tactics at build time and ignores it.
    onnx_cache: keep the intermediate ONNX export in the diffship cache, keyed by the weights, graph
        code and options, so a rebuild (other profiles, optimization level...) skips it (default true).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffship._cache import enforce_cap, touch
from diffship._files import atomic_folder, atomic_write, cache_dir, code_fingerprint, read_json, write_json
from diffship._isolate import run_isolated
from diffship.backends.manifest import ComponentEntry
from diffship.backends.onnx import MODEL_FILE as ONNX_FILE, OnnxExportOptions
from diffship.backends.tensorrt import (FLAVOURS, TARGETS, TENSORRT, EngineProfile, TensorRTDetails,
                                        TensorRTExportOptions, engine_name, installed_flavours, target_tag)
from diffship.configs.fields import parse, to_data
from diffship.errors import DiffshipError, ExportError, MissingBackendError, ShapeError
from diffship.exporters import onnx as onnx_exporter
from diffship.exporters.base import ExportOptions, io_description
from diffship.reference.shapes import ShapeRange
from diffship.reference.specs import ComponentSpec
from diffship.reference.wrappers import graph_fingerprint

log = logging.getLogger("diffship")

BF16_OPSET = 22


def choose_flavour(requested: str | None) -> str:
    """The flavour to build with: the requested one (installed), else the first installed."""
    found = installed_flavours()
    if requested:
        if requested not in found:
            package = "tensorrt (from NVIDIA's package index)" if requested == "tensorrt" else "tensorrt-rtx-cu12"
            raise MissingBackendError(f"tensorrt ({FLAVOURS[requested]})", package, TENSORRT.extra)
        return requested
    if not found:
        raise MissingBackendError(TENSORRT.name, "tensorrt' or 'tensorrt_rtx", TENSORRT.extra)
    return found[0]


# --- shape profiles ---------------------------------------------------------------------------------------


def resolve_profiles(value: Any, options: ExportOptions) -> list[ShapeRange]:
    """The request-shape ranges to build optimization profiles for, from ``-o profile=...``.

    ``options.profile`` is the export's size and batch (``--static HxW --batch N``, or the model's
    default); presets scale around it. A ``--static`` export takes exactly its own shape.

    Raises:
        ShapeError: an unknown preset, a malformed range, or sizes the UNet cannot take.
    """
    from diffship.configs import load_shape_presets

    base = options.profile
    if value is None:
        value = "static" if options.static else "dynamic"
    if value == "static":
        ranges = [ShapeRange.fixed(base)]
    elif isinstance(value, str):
        presets = load_shape_presets()
        if value not in presets:
            raise ShapeError(f"unknown shape profile {value!r}; choose static, {', '.join(presets)}, or give "
                             f"explicit ranges as JSON: {{\"batch\": [1, 1, 4], \"height\": [256, 512, 1024], ...}}")
        ranges = [_preset_range(presets[value], base, options.size_multiple)]
    elif isinstance(value, dict):
        ranges = [_explicit_range(value, base, options.text_sequence)]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        ranges = [_explicit_range(v, base, options.text_sequence) for v in value]
    else:
        raise ShapeError(f"profile must be a preset name, a JSON object or a list of them, got {value!r}")
    fixed = ShapeRange.fixed(base)
    if options.static and any(r != fixed for r in ranges):
        raise ShapeError(f"a --static export takes exactly {fixed.describe()}; drop --static to build engines "
                         f"for a range of shapes")
    for r in ranges:
        r.validate(options.size_multiple)
    return ranges


def _preset_range(preset: dict[str, list], base, multiple: int) -> ShapeRange:
    def scaled(size: int) -> tuple[int, int, int]:
        lo, hi = (max(multiple, round(size * f / multiple) * multiple) for f in preset["size"])
        return lo, size, hi

    batch = (min(preset["batch"][0], base.batch_size), base.batch_size, max(preset["batch"][1], base.batch_size))
    return ShapeRange(batch=batch, height=scaled(base.height), width=scaled(base.width),
                      sequence_length=base.sequence_length, guidance=base.guidance)


def _explicit_range(data: dict[str, Any], base, text_sequence: int | None) -> ShapeRange:
    unknown = sorted(set(data) - {"batch", "height", "width", "text_sequence"})
    if unknown:
        raise ShapeError(f"unknown profile key(s) {', '.join(unknown)}; use batch, height, width, text_sequence")
    if "text_sequence" in data and text_sequence is None:
        raise ShapeError(f"profile text_sequence: this pipeline has no T5 encoder (its text is CLIP's "
                         f"{base.sequence_length} tokens, fixed); drop text_sequence from the profile")

    def triple(key: str, default: int) -> tuple[int, int, int]:
        value = data.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,) * 3
        if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in value):
            return tuple(value)
        raise ShapeError(f"profile {key} must be a whole number or [min, opt, max], got {value!r}")

    return ShapeRange(batch=triple("batch", base.batch_size), height=triple("height", base.height),
                      width=triple("width", base.width), sequence_length=base.sequence_length, guidance=base.guidance,
                      text_sequence=triple("text_sequence", text_sequence) if "text_sequence" in data else None)


def _check_targets(flavour: str, targets: tuple[str, ...]) -> None:
    known = TARGETS[flavour]
    if flavour == "tensorrt_rtx":
        hint = "e.g. sm86,sm89 (" + ", ".join(sorted(known)) + ")"
    else:
        hint = "ampere+ (hardware-compatible) or leave it out (the building GPU)"
    bad = [t for t in targets if t not in known]
    if bad:
        raise ExportError(f"compute_capability {', '.join(bad)} is not valid for {FLAVOURS[flavour]}; use {hint}")


# --- the ONNX step ---------------------------------------------------------------------------------------


def _onnx_key(spec: ComponentSpec, module: nn.Module, options: ExportOptions) -> str:
    """What the ONNX export of ``module`` depends on: weights, architecture, IO, the code of the wrappers
    and of the ONNX exporter (an explicit version plus their parsed code, so moving them or editing a
    comment changes nothing), options and library versions."""
    from diffship import __version__
    from diffship.backends.manifest import library_versions

    h = hashlib.sha256()
    h.update(json.dumps({"component": spec.name, "precision": options.precision, "static": options.static,
                         "profile": to_data(options.profile) if options.static else None,
                         "onnx": to_data(options.backend), "versions": library_versions(), "diffship": __version__,
                         "io": [[t.name, t.dtype, list(t.dims)] for t in (*spec.inputs, *spec.outputs)],
                         "graphs": graph_fingerprint(), "exporter": code_fingerprint(onnx_exporter),
                         "module": repr(module)}, sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    return h.hexdigest()


def onnx_for(spec: ComponentSpec, module: nn.Module, options: ExportOptions, build: TensorRTExportOptions,
             scratch: Path) -> tuple[Path, dict[str, Any]]:
    """The ONNX graph of ``module``: from the diffship cache when an identical export exists, else
    exported now (into the cache, or into ``scratch`` when ``build.onnx_cache`` is off)."""
    opset = max(build.opset, BF16_OPSET) if options.precision == "bf16" else build.opset  # bf16 convolutions: 22+
    onnx_options = replace(options, backend=OnnxExportOptions(opset=opset, external_data=build.external_data))
    start = time.perf_counter()
    if not build.onnx_cache:
        entry = onnx_exporter.export(spec, module, scratch, onnx_options)
        return scratch / ONNX_FILE, {**to_data(entry.details, drop_none=True), "cached": None, "reused": False,
                                     "seconds": round(time.perf_counter() - start, 2)}
    key = _onnx_key(spec, module, onnx_options)
    folder = cache_dir() / "onnx" / f"{spec.name}-{options.precision}-{key[:24]}"
    reused = (folder / "artifact.json").is_file()
    if reused:
        touch(folder)  # the cap removes the least recently used entries first
    else:
        try:
            with atomic_folder(folder, wait=True) as tmp:
                entry = onnx_exporter.export(spec, module, tmp, onnx_options)
                write_json(tmp / "artifact.json", {"details": to_data(entry.details, drop_none=True)})
        except DiffshipError:
            if not (folder / "artifact.json").is_file():  # not just another process finishing first
                raise
        if build.onnx_cache_max_gb:
            enforce_cap("onnx", int(build.onnx_cache_max_gb * 1e9), keep=folder)
    details = read_json(folder / "artifact.json")["details"]
    return folder / ONNX_FILE, {**details, "cached": str(folder), "reused": reused,
                                                "seconds": round(time.perf_counter() - start, 2)}


def _cache_note(path: str | None, facts: dict[str, Any], flavour: str) -> str:
    if flavour == "tensorrt_rtx":
        return "not used (TensorRT-RTX times no tactics at build time; it compiles kernels on the GPU at load)"
    if path is None:
        return "off"
    return f"{'loaded' if facts.get('loaded_bytes') else 'started'} and saved ({facts.get('saved_bytes', 0)} bytes)"


def default_timing_cache(flavour: str, version: str) -> Path:
    """One file per flavour, version and GPU model (a cache of one GPU does not help another)."""
    gpu = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "gpu"
    return cache_dir() / "tensorrt" / f"{flavour}-{version}-{gpu}.timing.cache"


# --- export ----------------------------------------------------------------------------------------------


def export(spec: ComponentSpec, module: nn.Module, out_dir: Path, options: ExportOptions) -> ComponentEntry:
    """Build ``out_dir/<engine name>.plan`` for ``module`` (already in the target precision).

    The ONNX export comes first (or from the cache); the build runs in a child interpreter so a crash
    in TensorRT becomes an :class:`ExportError`. ``options.backend`` is a
    :class:`~diffship.backends.tensorrt.TensorRTExportOptions` (defaults when None).
    """
    TENSORRT.require()
    opts: TensorRTExportOptions = options.backend or TensorRTExportOptions()
    flavour = choose_flavour(opts.flavour)
    _check_targets(flavour, opts.compute_capability)
    version = importlib.import_module(flavour).__version__
    ranges = resolve_profiles(opts.profile, options)
    for r in ranges:
        try:
            spec.check_dims(spec.dims(replace(options.profile, height=r.height[2], width=r.width[2])))
        except ShapeError as exc:
            raise ShapeError(f"profile {r.describe()}: {exc}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, outputs = io_description(spec, options)
    timing_cache = None
    if opts.timing_cache and flavour == "tensorrt":
        timing_cache = str(opts.timing_cache if isinstance(opts.timing_cache, str)
                           else default_timing_cache(flavour, version))
    name = engine_name(options.precision, ranges, flavour, version, target_tag(flavour, opts.compute_capability))
    with tempfile.TemporaryDirectory(prefix="diffship-onnx-") as scratch:
        onnx_path, onnx_facts = onnx_for(spec, module, options, opts, Path(scratch))
        request = {
            "component": spec.name, "flavour": flavour, "onnx": str(onnx_path), "engine": str(out_dir / name),
            "profiles": [{k: [list(s) for s in v] for k, v in spec.input_ranges(r).items()} for r in ranges],
            "fp32": options.precision == "fp32", "tf32": opts.tf32, "refit": opts.refit,
            "optimization_level": opts.optimization_level, "compute_capability": list(opts.compute_capability),
            "timing_cache": timing_cache, "verbose": log.isEnabledFor(logging.DEBUG),
        }
        facts = run_isolated(f"building the {spec.name} TensorRT engine", build_engine, request, error=ExportError)
    cache_note = _cache_note(timing_cache, facts["timing_cache"], flavour)
    details = TensorRTDetails(
        engine=name, flavour=flavour, tensorrt_version=version, strongly_typed=True,
        compute_capability=facts["compute_capability"], tf32=facts["tf32"],
        profiles=[parse(EngineProfile, {"request": to_data(r), "inputs": p}, "profile key", error=ExportError)
                  for r, p in zip(ranges, facts["profiles"])],
        optimization_level=facts["optimization_level"], refittable=opts.refit,
        timing_cache={"path": timing_cache, **facts["timing_cache"]} if timing_cache else {"note": cache_note},
        onnx=onnx_facts,
        timings={"onnx_export": onnx_facts["seconds"], "engine_build": facts["seconds"]},
        notes=[f"ONNX {'reused from' if onnx_facts['reused'] else 'exported into'} the cache" if onnx_facts["cached"]
               else "ONNX exported (cache off)",
               f"timing cache {cache_note}"],
    )
    return ComponentEntry(component=spec.name, source=spec.source, files=[name], precision=options.precision,
                          inputs=inputs, outputs=outputs, details=details)


# --- the build (runs in a child interpreter) ------------------------------------------------------------


def build_engine(request: dict[str, Any]) -> dict[str, Any]:
    """Parse the ONNX file, add the optimization profiles, build and write the engine.

    Module-level so :func:`~diffship._isolate.run_isolated` can call it in a fresh interpreter.

    Returns:
        Facts read back from TensorRT: per profile the (min, opt, max) shape of every input, the
        compute-capability targets, the optimization level, timing-cache use and the build time.
    """
    trt = importlib.import_module(request["flavour"])
    rtx = request["flavour"] == "tensorrt_rtx"
    logger = _collecting_logger(trt, request["verbose"])
    name = request["component"]
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(request["onnx"]):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)] or logger.errors or ["no reason given"]
        raise ExportError(f"TensorRT could not parse the {name} ONNX graph: {errors[0]}; re-run with --debug")
    config = builder.create_builder_config()
    network_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    readback = []
    for shapes in request["profiles"]:
        profile = builder.create_optimization_profile()
        if sorted(shapes) != sorted(network_inputs):
            raise ExportError(f"the {name} graph has inputs {network_inputs}, the profile names {sorted(shapes)}")
        for input_name, (lo, opt, hi) in shapes.items():
            profile.set_shape(input_name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise ExportError(f"TensorRT refused the {name} optimization profile {shapes}: "
                              f"{_last(logger)}")
        readback.append({n: dict(zip(("min", "opt", "max"), ([int(d) for d in s] for s in profile.get_shape(n))))
                         for n in network_inputs})
    if request["fp32"]:
        (config.set_flag if request["tf32"] else config.clear_flag)(trt.BuilderFlag.TF32)
    if request["optimization_level"] is not None:
        config.builder_optimization_level = request["optimization_level"]
    if request["refit"]:
        config.set_flag(trt.BuilderFlag.REFIT)
    targets = _set_targets(trt, config, request["compute_capability"], rtx)
    cache_facts: dict[str, Any] = {}
    if request["timing_cache"]:
        path = Path(request["timing_cache"])
        blob = path.read_bytes() if path.is_file() else b""
        try:
            cache = config.create_timing_cache(blob)
        except Exception:  # written by another TensorRT version: start afresh
            blob, cache = b"", config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):  # made on another GPU: start afresh
            blob = b""
            config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
        cache_facts = {"loaded_bytes": len(blob)}
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        hint = "re-run with --debug, and check the shape profile and free memory"
        if rtx and request["refit"] and any("CUDA_SUCCESS" in e for e in logger.errors):
            # Measured with TensorRT-RTX 1.7: refittable builds JIT-compile through CUDA, so need a GPU.
            hint = "TensorRT-RTX builds refittable engines only where a GPU is: build without -o refit=true here"
        raise ExportError(f"TensorRT could not build the {name} engine: {_last(logger)}; {hint}")
    atomic_write(Path(request["engine"]), memoryview(plan))  # no second in-memory copy of a multi-GB plan
    if request["timing_cache"]:
        saved = memoryview(config.get_timing_cache().serialize())
        atomic_write(Path(request["timing_cache"]), saved)
        cache_facts["saved_bytes"] = saved.nbytes
    return {"profiles": readback, "compute_capability": targets, "tf32": bool(config.get_flag(trt.BuilderFlag.TF32)),
            "optimization_level": int(config.builder_optimization_level), "timing_cache": cache_facts,
            "seconds": round(seconds, 2)}


def _set_targets(trt, config, targets: list[str], rtx: bool) -> dict[str, Any]:
    """Apply the target GPUs; return what the engine will run on, for the manifest."""
    if rtx:
        if not targets:
            return {"targets": "portable", "note": "TensorRT-RTX default: Ampere (sm80) and later"}
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, t.upper()), i)
        return {"targets": [str(config.get_compute_capability(i)).split(".")[-1].lower() for i in range(len(targets))]}
    if "ampere+" in targets:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        return {"targets": "ampere+"}
    major, minor = torch.cuda.get_device_capability()
    return {"targets": [f"sm{major}{minor}"], "note": "the GPU it was built on"}


def _collecting_logger(trt, verbose: bool):
    """A TensorRT logger that keeps errors for our messages (printing them only with --debug)."""

    class Collecting(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if verbose:
                print(f"[{trt.__name__}] {severity.name}: {msg}")

    return Collecting()


def _last(logger) -> str:
    """The most telling error: TensorRT-RTX on a host without a GPU also logs CUDA probing errors."""
    useful = [e for e in logger.errors if "Cuda Runtime" not in e and "CUDA driver" not in e]
    return (useful or logger.errors or ["no reason given"])[-1].strip().splitlines()[0]

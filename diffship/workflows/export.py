"""Export a whole pipeline: load the source, export each component with its backend's exporter (with fp32
fallbacks, the overflow probe and calibration), write the folder atomically with its manifest.

This is the one place that uses an exporter and a runtime together (the probe runs a fresh export), so
it sits above both; ``diffship.export_pipeline`` is its public name.
"""

from __future__ import annotations

import copy
import gc
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from diffship import backends
from diffship._files import atomic_folder, check_destination
from diffship.backends import Backend
from diffship.backends.manifest import ComponentEntry, Manifest, Shapes, library_versions
from diffship.backends.quantized import FULL_INT8, kept_groups, quantizes
from diffship.errors import DiffshipError, ShapeError
from diffship.exporters.base import ExportOptions
from diffship.progress import Progress, silent, watch_folder
from diffship.reference import ShapeProfile, family_of, load_with_info
from diffship.reference.loader import stored_weights
from diffship.reference import memory
from diffship.reference.memory import available_memory_bytes, largest_tensor
from diffship.reference.pipelines import pipeline_configs, save_module_config, write_pipeline_files
from diffship.reference.shapes import PRECISIONS
from diffship.reference.specs import ComponentSpec, size_multiple, vae_scale_factor
from diffship.reference.weights import StoredWeights, materialized, streamed_copy, weight_bytes

log = logging.getLogger("diffship")


def default_profile(pipe: Any, batch_size: int = 1, size: tuple[int, int] | None = None,
                    guidance: bool = True) -> ShapeProfile:
    """The pipeline's default request shape (diffusers' default height/width), or ``size``."""
    f = vae_scale_factor(dict(pipe.vae.config))
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    # Flux's transformer has no sample size: its pipelines default to 128 latent pixels a side.
    default = (getattr(denoiser.config, "sample_size", None) or pipe.default_sample_size) * f
    height, width = size or (default, default)
    profile = ShapeProfile(batch_size=batch_size, height=height, width=width,
                           sequence_length=(pipe.tokenizer or pipe.tokenizer_2).model_max_length, guidance=guidance)
    profile.validate(f)
    return profile


def converted_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` whose floating-point weights are ``dtype``, made without a full-precision copy
    first (``deepcopy(m).to(dtype)`` would briefly hold the weights twice in fp32: 10 GB more for an
    SDXL UNet). The original is left as it is: an fp32 fallback is exported from it."""
    memo: dict[int, Any] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in memo:
            continue
        value = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach().clone()
        memo[id(tensor)] = torch.nn.Parameter(value, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else value
    return copy.deepcopy(module, memo)


def _values(outputs: dict[str, torch.Tensor] | tuple | torch.Tensor) -> list[torch.Tensor]:
    return list(outputs.values() if isinstance(outputs, dict) else (outputs,) if isinstance(outputs, torch.Tensor)
                else outputs)


def _non_finite(outputs, names: list[str], precision: str) -> str | None:
    bad = [name for name, value in zip(names, _values(outputs)) if not torch.isfinite(value).all()]
    return f"non-finite values in {', '.join(bad)} at {precision}" if bad else None


#: an fp16 activation this large has overflowed, or been clamped where it would have (T5 clamps to max - 1000).
_FP16_SATURATED = torch.finfo(torch.float16).max - 1000


def _run_watching(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[Any, str | None]:
    """Run the reduced torch module; also the first submodule whose fp16 output reaches the fp16 limit
    (infinite, or clamped there as T5 clamps), None if none."""
    hits: list[str] = []

    def watch(name: str):
        def hook(_module, _inputs, output):
            for t in (output if isinstance(output, (tuple, list)) else (output,)):
                if (not hits and isinstance(t, torch.Tensor) and t.dtype == torch.float16
                        and t.numel() and float(t.abs().max()) >= _FP16_SATURATED):
                    hits.append(name)
        return hook

    handles = [m.register_forward_hook(watch(name)) for name, m in module.named_modules() if name]
    try:
        with torch.no_grad():
            outputs = module(*inputs.values())
    finally:
        for h in handles:
            h.remove()
    return outputs, hits[0] if hits else None


def _probe_torch(spec: ComponentSpec, module: torch.nn.Module, options: ExportOptions, compute: str,
                 runnable: bool) -> str | None:
    """Why the reduced torch module (``compute``: fp16, bf16; Core ML's palettes compute in fp16) cannot be
    exported at that precision, from one watched run on the example inputs, or None.

    An activation that reaches the fp16 limit is refused even when the outputs stay finite, as they do for
    T5, which clamps fp16 infinities to the largest fp16 value and so returns wrong hidden states (a
    saturating tiny T5: cosine 0.9997 to fp32). Outputs are not compared with fp32 instead: on random
    inputs a sound fp16 export differs about as much (tiny-flux's transformer through Core ML fp16: cosine
    0.99986). Non-finite outputs are refused here only where the export cannot run (``runnable``): where it
    can, the export's own outputs decide (:func:`_probe_export`).
    """
    outputs, saturated = _run_watching(module, spec.example_inputs(options.profile, compute))
    if not runnable and (reason := _non_finite(outputs, spec.output_names, compute)):
        return reason
    if saturated:
        return f"{saturated} overflows at {compute} on the example inputs (activations reach fp16's limit, 65504)"
    return None


def _probe_export(record: Backend, spec: ComponentSpec, folder: Path, entry: ComponentEntry,
                  options: ExportOptions) -> str | None:
    """Run a fresh reduced-precision export once on the example inputs; describe non-finite outputs, else None."""
    from diffship.runtimes import open_runner

    with open_runner(record.name, folder, entry) as runner:
        outputs = runner.infer(spec.example_inputs(options.profile, options.precision))
    return _non_finite(outputs, spec.output_names, options.precision)


def _with_fallback(entry: ComponentEntry, reason: str) -> ComponentEntry:
    entry.details.fp32_fallback = reason
    return entry


def _modules(spec: ComponentSpec, eager: torch.nn.Module, stored: StoredWeights | None, options: ExportOptions):
    """``compute -> (module, options)``: the spec's wrapper of ``eager`` computing in ``compute`` (fp32, fp16,
    bf16), and the export options for it. A streamed component (``stored``: its weights are in files, the
    module is empty) gets placeholders and ``options.weights``; another gets a converted copy."""

    def make(compute: str) -> tuple[torch.nn.Module, ExportOptions]:
        dtype = PRECISIONS.get(compute, torch.float32)
        wrapper = spec.wrapper(eager).eval()
        if stored is not None:
            module, feed = streamed_copy(wrapper, eager, stored, dtype)
            return module, replace(options, weights=feed)
        return (converted_copy(wrapper, dtype) if dtype != torch.float32 else wrapper), options

    return make


def _export_component(record: Backend, exporter: ModuleType, spec: ComponentSpec, eager: torch.nn.Module,
                      folder: Path, options: ExportOptions, stored: StoredWeights | None = None) -> ComponentEntry:
    """Export one component; a reduced-precision export that overflows (non-finite outputs, or saturated
    activations: :func:`_probe_torch`, :func:`_probe_export`) is replaced by an fp32 one.

    A streamed component (``stored``) is probed where it fits in memory: in torch at fp16 on its weights
    read into a module (bf16 has fp32's range), and by running its export."""
    make = _modules(spec, eager, stored, options)
    # force_upcast guards against fp16's range; full-int8's VAE decoder dequantizes its 8-bit products to
    # fp32, and its outputs must reach a measured floor (else its activations stay float)
    int8_decoder = options.precision == FULL_INT8 and spec.int8_activations
    if options.precision != "fp32" and spec.keep_fp32 and not int8_decoder:
        module, opts = make("fp32")
        entry = exporter.export(spec, module, folder, replace(opts, precision="fp32"))
        return _with_fallback(entry, "kept in fp32: the VAE config sets force_upcast (diffusers runs it in fp32)")
    # Weight formats (Core ML palettes, int8) say which precision they compute in.
    compute = record.compute_precision(options.precision)
    reduced = PRECISIONS.get(compute, torch.float32) != torch.float32
    module, opts = make(compute)
    fits = stored is None or memory.fits(weight_bytes(module), copies=2)  # a runtime holds its own copy
    runnable = options.precision != "fp32" and record.unavailable_reason() is None and fits
    # before exporting: an exporter may convert the module it is given (OpenVINO traces in fp32)
    reason = None
    if reduced and stored is None:
        reason = _probe_torch(spec, module, options, compute, runnable)
    elif reduced and fits and compute == "fp16":
        reason = _probe_torch(spec, materialized(module, opts.weights), options, compute, runnable)
    if reason is None:
        entry = exporter.export(spec, module, folder, opts)
        if runnable:
            reason = _probe_export(record, spec, folder, entry, options)
        if reason is None:
            return entry
        shutil.rmtree(folder)
    log.warning("%s: %s; exporting it in fp32 instead", spec.name, reason)
    module, opts = make("fp32")
    entry = exporter.export(spec, module, folder, replace(opts, precision="fp32"))
    return _with_fallback(entry, reason)


def export_pipeline(
    source: str | Path,
    out: str | Path,
    *,
    backend: str = "onnx",
    precision: str = "fp32",
    static: tuple[int, int] | None = None,
    batch_size: int = 1,
    guidance: bool = True,
    overwrite: bool = False,
    config: str | Path | None = None,
    allow_pickle: bool = False,
    backend_options: dict[str, Any] | None = None,
    components: list[str] | None = None,
    progress: Progress | None = None,
    stream: bool | None = None,
    runtime: dict[str, Any] | None = None,
    calibration_size: tuple[int, int] | None = None,
    calibration_steps: int | None = None,
) -> Manifest:
    """Export every component of a diffusers pipeline to ``backend``.

    Args:
        source: what :func:`diffship.reference.load` accepts (folder, single file, preset).
        out: the folder to create. It appears only once complete (written beside it, then renamed).
        backend: a backend name (see :mod:`diffship.backends`).
        precision: one of the backend's precisions (``fp32``, ``fp16``; weight formats such as ``int8``
            where the backend has them); components that overflow are kept in fp32.
        static: ``(height, width)`` to export fixed shapes; dynamic batch/height/width otherwise.
        batch_size: images per call the static export takes (the UNet gets twice that, for guidance).
        guidance: whether requests use classifier-free guidance (fixes the static UNet batch at 2x).
        overwrite: replace ``out`` if it exists.
        config: local diffusers folder with configs for a single-file ``source``.
        allow_pickle: allow pickle weights (read with ``torch.load(weights_only=True)``).
        backend_options: the backend's export options (``-o KEY=VALUE``), validated before any work.
        components: export only these components (default: all).
        progress: called with a line of text before each step.
        stream: copy each weight from the source's safetensors files into the export as it is written,
            tracing modules that hold no weights, so no more than one tensor is in memory at once (see
            :mod:`diffship.reference.weights`). None: wherever the backend streams (``Backend.streams``),
            the source is a folder or preset and the precision needs no calibration runs; True: refuse
            where it cannot; False: load the whole pipeline first. The exported weights are the same.
        calibration_size: ``(height, width)`` of the eager runs calibrated precisions record (default: the
            export's size, at most the backend's ``calibration_side`` a side).
        calibration_steps: denoising steps of each of those runs (default
            :data:`~diffship.reference.recording.CALIBRATION_STEPS`): the steps the pipeline will run, where
            known, give the UNet those timesteps and the VAE decoder latents as noisy as it will see.
        runtime: runtime options the export records as the ones it runs with (``load_pipeline``'s defaults
            for it; the caller's options still win); the backend's defaults fill in the rest.

    Returns:
        The manifest written to ``out/diffship.json``.
    """
    record = backends.get(backend)
    exporter = record.exporter_module()
    if precision not in record.precisions:
        raise DiffshipError(f"unknown precision {precision!r} for {backend}; choose one of: "
                            f"{', '.join(record.precisions)}")
    parsed = record.parse_export_options(backend_options or {})
    record.parse_runtime_options(runtime or {})  # refused before any work
    out = Path(out)
    check_destination(out, overwrite, is_export, "diffship export")  # before minutes of work, not after
    say = progress or silent
    streaming = _streaming(record, precision, source, stream, parsed)
    say(f"loading {source}" + (" (weights streamed from its files)" if streaming else ""))
    pipe, info = load_with_info(source, config=config, allow_pickle=allow_pickle, stream=streaming)
    stored = stored_weights(pipe, info) if streaming else {}
    profile = default_profile(pipe, batch_size, static, guidance)
    family = family_of(type(pipe).__name__)
    configs = pipeline_configs(pipe)
    specs = family.specs(configs)
    multiple = size_multiple(specs)
    text_sequence = next((n for n in (s.default_text_sequence() for s in specs) if n is not None), None)
    if components:
        unknown = sorted(set(components) - {s.name for s in specs})
        if unknown:
            raise DiffshipError(f"unknown component(s) {', '.join(unknown)}; this pipeline has: "
                                f"{', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in components]
    if static:
        _check_static(profile, specs, multiple)
    from diffship import __version__

    options = ExportOptions(precision=precision, profile=profile, static=static is not None, backend=parsed,
                            size_multiple=multiple, text_sequence=text_sequence,
                            metadata={"source": info.name, "source_fingerprint": info.fingerprint,
                                      "diffship_version": __version__, "pipeline_class": type(pipe).__name__})
    calibration = {}
    # the denoiser's calls; with full-int8, the VAE decoder's too unless -o keep_float keeps it float (its
    # calls are decodes): no eager run where no exported component needs them
    keep = kept_groups(getattr(parsed, "keep_float", "auto"))
    recorded = [s for s in specs if s.denoiser or (precision == FULL_INT8 and quantizes(s, keep))]
    if precision in record.calibrated and recorded:
        from diffship.reference.recording import CALIBRATION_STEPS, calibration_inputs

        size = calibration_size or _calibration_size(profile, record.calibration_side, multiple)
        calibration = calibration_inputs(pipe, recorded, steps=calibration_steps or CALIBRATION_STEPS,
                                         progress=say, size=size)
    entries: dict[str, ComponentEntry] = {}
    with atomic_folder(out, overwrite=overwrite, replaceable=is_export, what="diffship export") as tmp:
        for spec in specs:
            say(f"exporting {spec.name} ({backend}, {precision})")
            eager = getattr(pipe, spec.source)
            with watch_folder(tmp / spec.name, say):
                entries[spec.name] = _export_component(record, exporter, spec, eager, tmp / spec.name,
                                                       replace(options, calibration=calibration.get(spec.name)),
                                                       stored.get(spec.source))
            save_module_config(eager, tmp / spec.name)
            gc.collect()  # the component's module and converted model hold reference cycles: free them now
        say("writing tokenizer, scheduler and manifest")
        write_pipeline_files(pipe, tmp, backend, {name: e.source for name, e in entries.items()},
                             Path(info.path) if streaming else None)
        manifest = Manifest(
            backend=backend, precision=precision, family=family.name, pipeline_class=type(pipe).__name__,
            tasks=family.tasks_for(entries, configs, static is not None or record.fixed_shapes), source=info,
            shapes=Shapes(static=static is not None, profile=profile), components=entries,
            versions=library_versions(record.versions()), runtime=record.runtime_settings(runtime),
        ).write(tmp)
    return manifest


def _streaming(record: Backend, precision: str, source: str | Path, stream: bool | None, options: Any) -> bool:
    """Whether an export streams its weights (see ``export_pipeline``'s ``stream``); ``options`` are the
    backend's parsed export options (a record may say why they cannot stream: ``cannot_stream``).

    Raises:
        DiffshipError: ``stream`` is True and the export cannot stream.
    """
    from diffship.reference.loader import resolve_source

    why = None
    if not record.streams:
        why = f"the {record.name} exporter converts a module that holds its weights"
    elif precision in record.calibrated:
        why = f"{precision} calibrates on eager runs of the whole pipeline"
    elif getattr(options, "cannot_stream", None):
        why = options.cannot_stream
    elif stream is not False and resolve_source(source)[1] == "single_file":
        why = "a single-file checkpoint is converted to diffusers modules as it loads"
    if stream and why:
        raise DiffshipError(f"cannot stream the weights of this export: {why}; export without --stream")
    return bool(stream is not False and why is None)


def _calibration_size(profile: ShapeProfile, side: int | None, multiple: int) -> tuple[int, int]:
    """The export's request size, scaled down (aspect kept, multiples of ``multiple``) to ``side`` at most."""
    height, width = profile.height, profile.width
    scale = min(1.0, side / max(height, width)) if side else 1.0
    return tuple(max(multiple, int(v * scale) // multiple * multiple) for v in (height, width))


def _check_static(profile: ShapeProfile, specs: list[ComponentSpec], multiple: int) -> None:
    """Refuse a static size the exported graphs could never run at: not a multiple of what the UNet
    takes, over what a model takes (SD3's positional embedding), or one whose largest single tensor exceeds
    this machine's available memory."""
    profile.validate(multiple)
    for spec in specs:
        spec.check_dims(spec.dims(profile))
    need, what = largest_tensor(specs, profile)
    available = available_memory_bytes()
    if available and need > available:
        raise ShapeError(f"--static {profile.height}x{profile.width}: the {what} alone take {need / 1e9:.1f} GB, and "
                         f"this machine has {available / 1e9:.1f} GB available; export a smaller size")


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is a diffship export (its manifest parses), which ``--overwrite`` may replace."""
    from diffship.backends.manifest import read_manifest

    try:
        read_manifest(folder, verify=False)
    except DiffshipError:
        return False
    return True

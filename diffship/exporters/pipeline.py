"""Export a whole pipeline: load the source, export each component, write the folder atomically."""

from __future__ import annotations

import copy
import logging
from dataclasses import fields, replace
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from diffship._files import atomic_folder, write_json
from diffship._registry import modules_with, registered
from diffship.errors import DiffshipError, MissingBackendError
from diffship.exporters.base import Artifact, ExportOptions
from diffship.manifest import library_versions, write_manifest
from diffship.reference import ShapeProfile, family_of, load_with_info
from diffship.reference.families import pipeline_configs
from diffship.reference.specs import PRECISIONS, ComponentSpec, size_multiple, vae_scale_factor

log = logging.getLogger("diffship")
Progress = Callable[[str], None]


def backends() -> dict[str, ModuleType]:
    """Every exporter module by backend name."""
    return {m.BACKEND: m for m in modules_with("diffship.exporters", "BACKEND")}


def backend_module(name: str) -> ModuleType:
    """The exporter module of ``name``, checked to be importable."""
    return registered("diffship.exporters", "BACKEND", name)


def available_backends() -> list[str]:
    """Backends whose packages are installed here."""
    out = []
    for name in backends():
        try:
            backend_module(name)
        except MissingBackendError:
            continue
        out.append(name)
    return out


def default_profile(pipe: Any, batch_size: int = 1, size: tuple[int, int] | None = None,
                    guidance: bool = True) -> ShapeProfile:
    """The pipeline's default request shape (diffusers' default height/width), or ``size``."""
    f = vae_scale_factor(dict(pipe.vae.config))
    default = pipe.unet.config.sample_size * f
    height, width = size or (default, default)
    profile = ShapeProfile(batch_size=batch_size, height=height, width=width,
                           sequence_length=(pipe.tokenizer or pipe.tokenizer_2).model_max_length, guidance=guidance)
    profile.validate(f)
    return profile


def save_module_config(module: Any, folder: Path) -> None:
    """Write a torch module's ``config.json`` the way its library does (diffusers or transformers)."""
    if hasattr(module, "save_config"):
        module.save_config(folder)
    else:
        module.config.save_pretrained(folder)


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


def _non_finite(outputs: dict[str, torch.Tensor] | tuple | torch.Tensor, names: list[str], precision: str) -> str | None:
    values = outputs.values() if isinstance(outputs, dict) else (outputs,) if isinstance(outputs, torch.Tensor) else outputs
    bad = [name for name, value in zip(names, values) if not torch.isfinite(value).all()]
    return f"non-finite values in {', '.join(bad)} at {precision}" if bad else None


def _overflows(backend: str, folder: Path, artifact: Artifact, spec: ComponentSpec, options: ExportOptions) -> str | None:
    """Run a freshly exported reduced-precision component once; describe any non-finite output, else None."""
    from diffship.runtimes import open_runner

    runner = open_runner(backend, folder, artifact.to_dict())
    outputs = runner.infer(spec.example_inputs(options.profile, options.precision))
    return _non_finite(outputs, spec.output_names, options.precision)


def _overflows_in_torch(spec: ComponentSpec, module: torch.nn.Module, options: ExportOptions) -> str | None:
    """The same probe on the reduced-precision torch module, for backends that cannot run here (a
    TensorRT engine built without a GPU): the module computes in the precision the engine will."""
    with torch.no_grad():
        outputs = module(*spec.example_inputs(options.profile, options.precision).values())
    return _non_finite(outputs, spec.output_names, options.precision)


def _export_component(mod: ModuleType, spec: ComponentSpec, eager: torch.nn.Module, folder: Path,
                      options: ExportOptions) -> Artifact:
    """Export one component; a reduced-precision export that overflows is replaced by an fp32 one."""
    from diffship.runtimes import runtime_available

    if options.precision != "fp32" and spec.keep_fp32:
        artifact = mod.export(spec, spec.wrapper(eager).eval(), folder, replace(options, precision="fp32"))
        artifact.details["fp32_fallback"] = "kept in fp32: the VAE config sets force_upcast (diffusers runs it in fp32)"
        return artifact
    module = spec.wrapper(eager).eval()
    # Weight formats (Core ML palettes, int8) say which precision they compute in.
    compute = getattr(mod, "COMPUTE", {}).get(options.precision, options.precision)
    reduced = PRECISIONS.get(compute, torch.float32) != torch.float32
    if reduced:
        module = converted_copy(module, PRECISIONS[compute])
    runnable = options.precision != "fp32" and runtime_available(mod.BACKEND)
    reason = _overflows_in_torch(spec, module, replace(options, precision=compute)) if reduced and not runnable else None
    if reason is None:
        artifact = mod.export(spec, module, folder, options)
        if runnable:
            reason = _overflows(mod.BACKEND, folder, artifact, spec, options)
        if reason is None:
            return artifact
        shutil.rmtree(folder)
    log.warning("%s: %s; exporting it in fp32 instead", spec.name, reason)
    artifact = mod.export(spec, spec.wrapper(eager).eval(), folder, replace(options, precision="fp32"))
    artifact.details["fp32_fallback"] = reason
    return artifact


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
) -> dict[str, Any]:
    """Export every component of a diffusers pipeline to ``backend``.

    Args:
        source: what :func:`diffship.reference.load` accepts (folder, single file, preset).
        out: the folder to create. It appears only once complete (written beside it, then renamed).
        backend: exporter backend name (see :func:`backends`).
        precision: one of the backend's ``PRECISIONS`` (``fp32``, ``fp16``; weight formats such as
            ``int8`` where the backend has them); components that overflow are kept in fp32.
        static: ``(height, width)`` to export fixed shapes; dynamic batch/height/width otherwise.
        batch_size: images per call the static export takes (the UNet gets twice that, for guidance).
        guidance: whether requests use classifier-free guidance (fixes the static UNet batch at 2x).
        overwrite: replace ``out`` if it exists.
        config: local diffusers folder with configs for a single-file ``source``.
        allow_pickle: allow pickle weights (read with ``torch.load(weights_only=True)``).
        backend_options: passed to the exporter as ``ExportOptions.extra``.
        components: export only these components (default: all).
        progress: called with a line of text before each step.

    Returns:
        The manifest written to ``out/diffship.json``.
    """
    mod = backend_module(backend)
    if precision not in mod.PRECISIONS:
        raise DiffshipError(f"unknown precision {precision!r} for {backend}; choose one of: {', '.join(mod.PRECISIONS)}")
    say = progress or (lambda _msg: None)
    say(f"loading {source}")
    pipe, info = load_with_info(source, config=config, allow_pickle=allow_pickle)
    profile = default_profile(pipe, batch_size, static, guidance)
    family = family_of(type(pipe).__name__)
    configs = pipeline_configs(pipe)
    specs = family.specs(configs)
    multiple = size_multiple(specs)
    if components:
        unknown = sorted(set(components) - {s.name for s in specs})
        if unknown:
            raise DiffshipError(f"unknown component(s) {', '.join(unknown)}; this pipeline has: "
                                f"{', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in components]
    from diffship import __version__

    options = replace(_options(precision, profile, static is not None, backend_options or {}), size_multiple=multiple,
                      metadata={"source": info.name, "source_fingerprint": info.fingerprint,
                                "diffship_version": __version__, "pipeline_class": type(pipe).__name__})
    calibration = {}
    if precision in getattr(mod, "CALIBRATED", ()):
        from diffship.reference.recording import calibration_inputs

        say(f"recording calibration inputs ({precision})")
        calibration = calibration_inputs(pipe, [s for s in specs if s.denoiser])
    out = Path(out)
    artifacts: dict[str, dict[str, Any]] = {}
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for spec in specs:
            say(f"exporting {spec.name} ({backend}, {precision})")
            eager = getattr(pipe, spec.source)
            artifact = _export_component(mod, spec, eager, tmp / spec.name,
                                         replace(options, calibration=calibration.get(spec.name)))
            save_module_config(eager, tmp / spec.name)
            artifacts[spec.name] = {"source": spec.source, **artifact.to_dict()}
        say("writing tokenizer, scheduler and manifest")
        _write_pipeline_files(pipe, tmp, backend, artifacts)
        manifest = write_manifest(tmp, {
            "backend": backend, "precision": precision, "family": family.name,
            "pipeline_class": type(pipe).__name__, "tasks": family.tasks_for(artifacts, configs),
            "source": info.to_dict(),
            "shapes": {"static": static is not None, "profile": profile.to_dict()},
            "components": artifacts, "versions": library_versions(mod.versions()),
        })
    return manifest


def _options(precision: str, profile: ShapeProfile, static: bool, backend_options: dict[str, Any]) -> ExportOptions:
    """ExportOptions from the pipeline-level arguments; ``backend_options`` naming a common field
    (``opset``, ``external_data``) set it, the rest go to ``extra`` for the backend to check."""
    common = {f.name for f in fields(ExportOptions)} - {"precision", "profile", "static", "extra", "calibration",
                                                         "size_multiple", "metadata"}
    return ExportOptions(precision=precision, profile=profile, static=static,
                         **{k: v for k, v in backend_options.items() if k in common},
                         extra={k: v for k, v in backend_options.items() if k not in common})


def _write_pipeline_files(pipe: Any, folder: Path, backend: str, artifacts: dict[str, Any]) -> None:
    """``model_index.json``, ``scheduler/``, ``tokenizer/``: the diffusers layout around the exported parts."""
    import diffusers

    exported_sources = {a["source"] for a in artifacts.values()}
    index = {"_class_name": type(pipe).__name__, "_diffusers_version": diffusers.__version__}
    index.update((k, v) for k, v in dict(pipe.config).items() if k not in exported_sources and not k.startswith("_"))
    for name in artifacts:
        index[name] = ["diffship", backend]
    for name, value in list(index.items()):
        if name.startswith("_") or name in artifacts or not isinstance(value, (list, tuple)) or value[0] is None:
            continue
        component = getattr(pipe, name, None)
        if component is not None and hasattr(component, "save_pretrained"):
            component.save_pretrained(folder / name)
    write_json(folder / "model_index.json", index)

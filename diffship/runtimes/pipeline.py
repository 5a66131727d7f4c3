"""Exported pipelines behind diffusers' own pipeline classes.

:func:`load_pipeline` builds the diffusers pipeline named in the export (or one for another task of
the same family) and hands it adapters in place of the torch modules. Adapters behave like the modules
as far as pipelines and users touch them -- ``.config``, ``.dtype``, ``.device``, calls with the same
arguments returning the same output classes -- and forward the tensors to a backend :class:`Runner`.
Host-side tensors stay float32 on the CPU; runners cast to the export's dtypes.

diffship's own tools use :func:`open_export`, which returns an :class:`ExportedPipeline`: the diffusers
pipeline with the manifest and runners beside it (nothing is patched onto the diffusers object), closed
as a context manager. A pipeline from :func:`load_pipeline` closes its runners when it is collected.
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from diffship._files import read_json
from diffship.backends import get as get_backend
from diffship.backends.base import describe_settings
from diffship.backends.manifest import Manifest, read_manifest
from diffship.errors import DiffshipError, ExportedModelError
from diffship.reference.families import family_of
from diffship.reference.specs import ComponentSpec
from diffship.runtimes import open_runner
from diffship.runtimes.adapters import ADAPTERS
from diffship.runtimes.base import Runner


def _load_library_component(family: Any, folder: Path, name: str, entry: list[str]):
    """A tokenizer, scheduler or feature extractor saved in the export, if the family allows its class
    there (:meth:`Family.component_class`); nothing else named in ``model_index.json`` is imported."""
    try:
        cls = family.component_class(name, entry)
    except DiffshipError as exc:
        raise ExportedModelError(f"{folder.parent}: {exc}") from None
    return cls.from_pretrained(folder)


def _absent(index: dict[str, Any]) -> set[str]:
    """Modules the source pipeline did not have (``[null, null]`` in model_index.json: the SDXL refiner's
    first text encoder and tokenizer)."""
    return {k for k, v in index.items() if isinstance(v, list) and v[0] is None}


def _module_configs(path: Path, manifest: Manifest, modules: tuple[str, ...],
                    index: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each pipeline module's config: from its exported component(s), or from the torch module saved
    beside them when an export left it out (``--component``)."""
    folders = {c.source: name for name, c in manifest.components.items()}
    configs = {}
    for module in modules:
        if module in _absent(index):
            continue
        config = path / folders.get(module, module) / "config.json"
        if not config.is_file():
            raise ExportedModelError(f"{path}: {config.relative_to(path)} is missing; re-run diffship export")
        configs[module] = read_json(config)
    return configs


def _static_note(manifest: Manifest) -> str:
    if not manifest.shapes.static:
        return ""
    p = manifest.shapes.profile
    guidance = " with classifier-free guidance" if p.guidance else ""
    return f" -- this export is static: {p.height}x{p.width} images, batch {p.batch_size}{guidance}"


def _close_all(runners: list[Runner]) -> None:
    for runner in runners:
        runner.close()


@dataclass
class ExportedPipeline:
    """A loaded export as diffship's own tools use it: the diffusers pipeline, and beside it the manifest
    and the runners its adapters call (which diffusers knows nothing of).

    Attributes:
        pipeline: the diffusers pipeline whose models are adapters over the runners.
        manifest: the export's (verified) manifest.
        runners: the runner of each exported component, by component name.
        path: the export folder.
        settings: the runtime options it runs with (the manifest's, then the caller's), defaults filled in.
    """

    pipeline: Any
    manifest: Manifest
    runners: dict[str, Runner]
    path: Path
    settings: dict[str, Any] = field(default_factory=dict)

    def describe_settings(self) -> str:
        """The settings as ``key=value`` pairs, for one line of a report."""
        return describe_settings(self.settings)

    def close(self) -> None:
        """Close every runner (saving what they keep, e.g. a TensorRT-RTX runtime cache)."""
        self._finalizer()

    def __enter__(self) -> "ExportedPipeline":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __post_init__(self) -> None:
        # Runners close when the pipeline is collected (or at exit) unless closed before.
        self._finalizer = weakref.finalize(self.pipeline, _close_all, list(self.runners.values()))

    def unet_runner(self) -> Runner:
        """The runner that does most of the work (the denoiser), else the first: what reports name."""
        return self.runners.get("unet") or next(iter(self.runners.values()))


def load_pipeline(path: str | Path, *, task: str | None = None, verify: bool = True, check_finite: bool = True,
                  source: Any = None, **runtime_options: Any):
    """Load an exported folder as a diffusers pipeline.

    Args:
        path: a folder written by ``diffship export``.
        task: ``text2img``, ``img2img`` or ``inpaint`` (default: the task of the exported pipeline).
            All tasks of a family share one export.
        verify: check every file against the sha256 in the manifest first.
        check_finite: refuse NaN or Inf going into or coming out of every exported component, naming
            the component and denoising step (:class:`~diffship.errors.NonFiniteError`); False skips
            the checks (raw-speed measurements).
        source: for a folder that carries no configs, scheduler or tokenizer (Apple's torch2coreml
            output), the source it was converted from (a folder, checkpoint or preset name, or the
            loaded diffusers pipeline), whose configs are used; ignored where the export has its own.
        **runtime_options: the backend's runtime options (ONNX Runtime: ``device``, ``threads``,
            ``provider_options``; see its record in :mod:`diffship.backends`). They win over the settings
            the export recorded (its manifest's ``runtime``: what ``diffship tune`` chose).

    Returns:
        An instance of the diffusers pipeline class for ``task``, whose models are adapters over the
        exported components. Schedulers swap as usual (``pipe.scheduler = X.from_config(...)``). Its
        runners are closed when it is garbage-collected (or at exit).

    Raises:
        ExportedModelError: not an export, an unfinished or tampered one.
        MissingBackendError: the backend's runtime package is not installed.
        OptionError: an unknown runtime option or a bad value.
    """
    return open_export(path, task=task, verify=verify, check_finite=check_finite, source=source,
                       **runtime_options).pipeline


@contextlib.contextmanager
def _pipeline_files(path: Path, manifest: Manifest, source: Any):
    """The folder holding the export's ``model_index.json``, configs, scheduler and tokenizer: the export
    itself, or (for a folder without them: Apple's) a temporary one written from ``source``."""
    if (path / "model_index.json").is_file():
        yield path
        return
    if source is None:
        raise ExportedModelError(f"{path} ({manifest.origin} export) carries no model_index.json, configs, scheduler or "
                                 f"tokenizer; pass the source it was converted from (--source SOURCE, "
                                 f"load_pipeline(..., source=...)), or write them beside it once: diffship adopt {path} "
                                 f"--source SOURCE")
    from diffship.backends.apple import write_pipeline_configs
    from diffship.reference.loader import load

    pipe = load(source) if isinstance(source, (str, Path)) else source
    with tempfile.TemporaryDirectory(prefix="diffship-configs-") as folder:
        write_pipeline_configs(pipe, Path(folder), manifest)
        yield Path(folder)


def open_export(path: str | Path, *, task: str | None = None, verify: bool = True, check_finite: bool = True,
                source: Any = None, **runtime_options: Any) -> ExportedPipeline:
    """Like :func:`load_pipeline`, returning the :class:`ExportedPipeline` (pipeline, manifest, runners),
    which closes its runners as a context manager."""
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    family = family_of(manifest.pipeline_class)
    task = task or family.task_of(manifest.pipeline_class)
    if task not in manifest.tasks:
        raise ExportedModelError(f"{path} cannot run {task!r}; it supports: {', '.join(manifest.tasks)}")
    cls = family.pipeline_class(task)
    options = manifest.runtime_options(runtime_options)
    parts: dict[str, dict[str, tuple[ComponentSpec, Runner]]] = {}
    opened: list[Runner] = []
    try:
        with _pipeline_files(path, manifest, source) as files:
            index = read_json(files / "model_index.json")
            configs = _module_configs(files, manifest, family.modules, index)
            specs = {s.name: s for s in family.specs(configs) if s.name in manifest.components}
            for name, spec in specs.items():
                runner = open_runner(manifest.backend, path / name, manifest.components[name], **options)
                opened.append(runner)
                runner.shape_note = runner.shape_note or _static_note(manifest)
                parts.setdefault(spec.source, {})[name] = (spec, runner)
            pipe = _build(family, cls, files, manifest, index, configs, parts, check_finite)
    except BaseException:
        _close_all(opened)
        raise
    runners = {name: runner for p in parts.values() for name, (_, runner) in p.items()}
    return ExportedPipeline(pipeline=pipe, manifest=manifest, runners=runners, path=path,
                            settings=get_backend(manifest.backend).runtime_settings(options))


def _build(family: Any, cls: type, path: Path, manifest: Manifest, index: dict[str, Any], configs: dict[str, Any],
           parts: dict[str, dict[str, tuple[ComponentSpec, Runner]]], check_finite: bool):
    """The diffusers pipeline ``cls`` over the adapters, with the export's library components
    (tokenizers, scheduler), the modules its source lacked (``[null, null]``) and its pipeline settings."""
    from diffship.reference.pipelines import build_pipeline

    modules: dict[str, Any] = {source: ADAPTERS[source](configs[source], p, check_finite)
                               for source, p in parts.items()}
    modules.update(dict.fromkeys(_absent(index)))
    for name, entry in index.items():
        if name.startswith("_") or name in manifest.components or name in modules:
            continue
        if not isinstance(entry, list):  # pipeline settings (SDXL: requires_aesthetics_score, ...)
            modules[name] = entry
        elif entry[0] is not None:
            modules[name] = _load_library_component(family, path / name, name, entry)
    accepted = inspect.signature(cls.__init__).parameters
    missing = [n for n, p in accepted.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and n != "self"
               and p.default is inspect.Parameter.empty and n not in modules
               and n not in ("safety_checker", "feature_extractor", "image_encoder")]
    if missing:
        raise ExportedModelError(f"{path}: {cls.__name__} needs {', '.join(missing)}, which this export lacks; "
                                 f"re-run diffship export")
    return build_pipeline(cls, modules)

"""Load the eager diffusers pipeline that gets exported: a local folder, a single file, or a preset."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from diffship._files import read_json, sha256_file_remembered
from diffship.errors import SourceError, first_line
from diffship.reference.families import family_of
from diffship.reference.integrity import check_classes, check_weights
from diffship.reference.presets import RECIPES, preset_path

#: built-in pipelines, built offline on first use; name -> function returning the cached folder.
PRESETS: dict[str, Callable[[], Path]] = {name: partial(preset_path, name) for name in RECIPES}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class SourceInfo:
    """Where an eager pipeline came from, as recorded in export manifests and parity reports.

    Attributes:
        name: what the user passed (``tiny``, a folder or a file).
        kind: ``preset``, ``folder`` or ``single_file``.
        path: the resolved folder or file.
        pipeline_class: the diffusers class name.
        fingerprint: sha256 over the source's weight and config files (names and contents).
    """

    name: str
    kind: str
    path: str
    pipeline_class: str
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fingerprint(path: Path) -> str:
    """A sha256 identifying a model source: every file of a folder (sorted), or one file."""
    import hashlib

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path if path.is_dir() else path.parent).as_posix().encode())
        h.update(sha256_file_remembered(f).encode())
    return h.hexdigest()


def _model_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    if not index.is_file():
        raise SourceError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); pass a folder saved with "
            f"save_pretrained(), a .safetensors checkpoint, or a preset ({', '.join(PRESETS)})"
        )
    try:
        data = read_json(index)
        data["_class_name"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{index} is not a valid model_index.json ({exc}); re-save the pipeline") from None
    return data


def _pipeline_class_name(folder: Path) -> str:
    return _model_index(folder)["_class_name"]


def _has_pickle_only(folder: Path) -> bool:
    weights = [p for p in folder.rglob("*") if p.suffix in (".safetensors", *_PICKLE_SUFFIXES)]
    return bool(weights) and not any(p.suffix == ".safetensors" for p in weights)


def _load_folder(folder: Path, allow_pickle: bool, stream: bool = False):
    index = _model_index(folder)
    class_name = index["_class_name"]
    fam = family_of(class_name)
    check_classes(folder, index, fam)
    cls = fam.pipeline_class(fam.task_of(class_name))
    pickle_only = _has_pickle_only(folder)
    if pickle_only and not allow_pickle:
        raise SourceError(
            f"{folder} holds only pickle weights (.bin/.ckpt); convert them to safetensors, or pass "
            f"--allow-pickle to load them with torch.load(weights_only=True)"
        )
    try:
        # Modules the pipeline was saved without ([null, null]: SD3 without its T5) are passed as None,
        # which diffusers requires of SD3's optional encoders.
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}
        empty = _empty_modules(folder, index, fam) if stream else {}
        if not stream:
            _check_fits(folder)
        pipe = cls.from_pretrained(
            # With --allow-pickle, each component takes safetensors where it has them, pickle elsewhere.
            folder, local_files_only=True, use_safetensors=None if allow_pickle else True,
            **{"safety_checker": None, "feature_extractor": None, **absent, **empty}, requires_safety_checker=False,
        )
    except Exception as exc:  # diffusers/transformers raise many types for a broken folder
        raise SourceError(f"loading the diffusers folder {folder} failed ({type(exc).__name__}: {first_line(exc)}); "
                          f"check that it is complete and was saved with save_pretrained()") from exc
    check_weights(folder, pipe, fam)
    return pipe


def _empty_modules(folder: Path, index: dict[str, Any], fam) -> dict[str, Any]:
    """The family's torch modules that are stored as safetensors, built empty (:func:`empty_module`) with
    the buffers their files store."""
    from diffship.reference.weights import StoredWeights, empty_module, fill_buffers, weight_files

    modules = {}
    for name, (library, class_name) in fam.modules.items():
        if isinstance(index.get(name), list) and index[name][0] is not None and weight_files(folder / name):
            modules[name] = empty_module(library, class_name, folder / name)
            fill_buffers(modules[name], StoredWeights(folder / name, modules[name]))
    return modules


def _load_single_file(path: Path, config: Path | None, allow_pickle: bool):
    if path.suffix in _PICKLE_SUFFIXES and not allow_pickle:
        raise SourceError(
            f"{path} is a pickle checkpoint; convert it to .safetensors, or pass --allow-pickle to load it "
            f"with torch.load(weights_only=True)"
        )
    import diffusers

    cls = diffusers.StableDiffusionPipeline
    kwargs: dict[str, Any] = {}
    if config is not None:
        cls = getattr(diffusers, family_of(_pipeline_class_name(Path(config))).pipelines["text2img"])
        kwargs["config"] = str(config)
    try:
        return cls.from_single_file(
            str(path), local_files_only=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **kwargs,
        )
    except Exception as exc:  # diffusers raises many types here; all mean the same to the user
        if config is None:
            raise SourceError(
                f"loading the single-file checkpoint {path} needs its model configs, which diffusers fetches "
                f"from the Hugging Face Hub (unreachable here): pass --config DIR (Python: config=DIR), a local "
                f"diffusers folder of the same architecture ({type(exc).__name__}: {exc})"
            ) from exc
        if isinstance(exc, OSError) and "Unable to load weights" in str(exc):
            # diffusers hides the reason (a corrupt file, or a pickle that weights_only refused).
            raise SourceError(
                f"could not read the checkpoint {path} ({exc.__cause__ or exc}); check that it is a complete "
                f".safetensors file (pickle checkpoints may only hold tensors)"
            ) from exc
        raise SourceError(
            f"loading the single-file checkpoint {path} with configs from {config} failed: {exc}; "
            f"check that {config} has the same architecture as the checkpoint"
        ) from exc


def _check_fits(folder: Path) -> None:
    """Refuse, before loading, a pipeline whose weights cannot fit in the memory available (loading
    would end in the out-of-memory killer, not an error)."""
    from diffship.reference.memory import available_memory_bytes, loading_bytes

    need, available = loading_bytes(folder), available_memory_bytes()
    if available and need > available:
        raise SourceError(f"{folder} takes {need / 1e9:.1f} GB of memory once loaded (its weights in float32), and "
                          f"this machine has {available / 1e9:.1f} GB available; it cannot be loaded whole here "
                          f"(free memory, or use a larger machine)")


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """Where ``source`` is and what kind it is (``preset``, ``folder``, ``single_file``), without loading it."""
    name = str(source)
    if name in PRESETS:
        return PRESETS[name](), "preset"
    path = Path(source).expanduser()
    if path.is_dir():
        return path, "folder"
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return path, "single_file"
    if path.is_file():
        raise SourceError(f"{path} is neither a diffusers folder nor a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})")
    raise SourceError(f"{source}: no such file or folder, and not a built-in preset ({', '.join(PRESETS)})")


def load_with_info(source: str | Path, *, config: str | Path | None = None, allow_pickle: bool = False,
                   stream: bool = False):
    """Like :func:`load`, and also return a :class:`SourceInfo` describing the source.

    With ``stream``, the torch modules a folder (or preset) stores as safetensors are built empty: their
    parameters on the meta device, without storage (:func:`~diffship.reference.weights.empty_module`),
    for an exporter to copy from the files tensor by tensor (:func:`stored_weights`); a single file
    loads as usual.
    """
    name = str(source)
    path, kind = resolve_source(source)
    if kind == "single_file":
        pipe = _load_single_file(path, Path(config) if config else None, allow_pickle)
    else:
        pipe = _load_folder(path, allow_pickle, stream)
    pipe.set_progress_bar_config(disable=True)
    info = SourceInfo(name=name, kind=kind, path=str(path.resolve()), pipeline_class=type(pipe).__name__,
                      fingerprint=fingerprint(path))
    return pipe, info


def stored_weights(pipe: Any, info: SourceInfo) -> dict[str, Any]:
    """The :class:`~diffship.reference.weights.StoredWeights` of each module of ``pipe`` that was loaded
    empty (``load_with_info(..., stream=True)``), by pipeline attribute."""
    from diffship.reference.weights import StoredWeights, is_empty

    if info.kind == "single_file":
        return {}
    return {name: StoredWeights(Path(info.path) / name, module)
            for name in family_of(info.pipeline_class).modules
            if (module := getattr(pipe, name, None)) is not None and is_empty(module)}


def load(source: str | Path, *, config: str | Path | None = None, allow_pickle: bool = False):
    """Load the eager diffusers pipeline for ``source``.

    Args:
        source: a local diffusers folder (with ``model_index.json``), a single-file checkpoint
            (``.safetensors``; pickle formats only with ``allow_pickle``), or a preset name (``tiny``).
        config: for single-file checkpoints, a local diffusers folder whose configs describe the
            checkpoint's architecture (diffusers would otherwise fetch them from the Hub).
        allow_pickle: allow ``.ckpt``/``.bin`` weights, read with ``torch.load(weights_only=True)``.

    Returns:
        The diffusers pipeline (fp32, CPU, safety checker off, progress bar off).

    Raises:
        SourceError: the source is missing, not a diffusers pipeline, or cannot be loaded offline.
        UnsupportedPipelineError: the pipeline class is not one diffship exports.
    """
    return load_with_info(source, config=config, allow_pickle=allow_pickle)[0]

"""Operations on diffusers pipeline objects that every tool shares: building one of another task from
components, choosing a compatible scheduler, reading the configs its family's specs are built from, and
writing the diffusers layout (configs, tokenizers, scheduler) around exported parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship._files import atomic_write, write_json
from diffship.errors import DiffshipError
from diffship.reference.families import family_of
from diffship.reference.specs import ComponentSpec
from diffship.reference.vocabulary import bpe_files
from diffship.reference.weights import copy_module_files, is_empty


def build_pipeline(cls: type, components: dict[str, Any]):
    """``cls(**components)`` with only the arguments ``cls`` takes, and the safety checker off where it has
    one: SDXL pipelines take no safety checker, and only img2img/inpaint take ``requires_aesthetics_score``
    (``pipe.components`` carries pipeline settings as well as modules)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {"safety_checker": None, "feature_extractor": None, **components}.items() if k in accepted}
    if "requires_safety_checker" in accepted:
        kwargs["requires_safety_checker"] = False
    return cls(**kwargs)


def scheduler_class(pipe: Any, name: str) -> type:
    """The scheduler class ``name`` if it is compatible with ``pipe`` (else an error listing those that are)."""
    compatible = {cls.__name__: cls for cls in [type(pipe.scheduler), *pipe.scheduler.compatibles]}
    if name not in compatible:
        raise DiffshipError(f"unknown or incompatible scheduler {name!r}; choose one of: "
                            f"{', '.join(sorted(compatible))}")
    return compatible[name]


def set_scheduler(pipe: Any, name: str | None) -> None:
    """Swap ``pipe``'s scheduler for the compatible class ``name`` (from its config), as diffusers users do;
    None keeps it."""
    if name is not None:
        pipe.scheduler = scheduler_class(pipe, name).from_config(pipe.scheduler.config)


def module_config(module: Any) -> dict[str, Any]:
    """A torch module's config (diffusers or transformers) as a plain dict."""
    cfg = module.config
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def pipeline_configs(pipe: Any) -> dict[str, dict[str, Any]]:
    """The configs of an eager pipeline's modules, as its family's spec function takes them (modules a
    pipeline leaves out, like the SDXL refiner's first text encoder, are absent)."""
    return {name: module_config(getattr(pipe, name)) for name in family_of(type(pipe).__name__).modules
            if getattr(pipe, name, None) is not None}


def specs_for_pipeline(pipe: Any) -> list[ComponentSpec]:
    """Component specs of an eager diffusers pipeline."""
    return family_of(type(pipe).__name__).specs(pipeline_configs(pipe))


def save_module_config(module: Any, folder: Path) -> None:
    """Write a torch module's ``config.json`` the way its library does (diffusers or transformers)."""
    if hasattr(module, "save_config"):
        module.save_config(folder)
    else:
        module.config.save_pretrained(folder)


def write_pipeline_files(pipe: Any, folder: Path, backend: str, sources: dict[str, str],
                         source_folder: Path | None = None) -> None:
    """``model_index.json``, ``scheduler/``, ``tokenizer/``: the diffusers layout around exported parts.

    Args:
        pipe: the eager pipeline the parts come from.
        folder: where to write (the export folder).
        backend: recorded for each exported part in ``model_index.json`` (``["diffship", backend]``).
        sources: exported component -> the pipeline module it replaces (``vae_decoder`` -> ``vae``).
        source_folder: the diffusers folder ``pipe`` was loaded from, where its modules loaded without
            weights (a streamed export's) are copied from.
    """
    import diffusers

    index = {"_class_name": type(pipe).__name__, "_diffusers_version": diffusers.__version__}
    index.update((k, v) for k, v in dict(pipe.config).items()
                 if k not in set(sources.values()) and not k.startswith("_"))
    for name in sources:
        index[name] = ["diffship", backend]
    for name, value in list(index.items()):
        if name.startswith("_") or name in sources or not isinstance(value, (list, tuple)) or value[0] is None:
            continue
        component = getattr(pipe, name, None)
        if component is not None and is_empty(component):
            # kept in torch by a --component export, loaded without its weights: its files as the source has them
            copy_module_files(Path(source_folder) / name, folder / name)
        elif component is not None and hasattr(component, "save_pretrained"):
            component.save_pretrained(folder / name)
            if type(component).__name__.startswith("CLIPTokenizer") and (folder / name / "tokenizer.json").is_file():
                # transformers 4 consumers (optimum) read the slow CLIP tokenizer's files; 5 writes only
                # tokenizer.json. (T5's Unigram tokenizer.json is read by transformers 4's fast tokenizer.)
                for file, text in bpe_files(folder / name).items():
                    if not (folder / name / file).is_file():
                        atomic_write(folder / name / file, text)
    write_json(folder / "model_index.json", index)

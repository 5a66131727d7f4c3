"""Operations on diffusers pipeline objects that every tool shares: building one of another task from
components, choosing a compatible scheduler, and reading the configs its family's specs are built from."""

from __future__ import annotations

from typing import Any

from diffship.errors import DiffshipError
from diffship.reference.families import family_of
from diffship.reference.specs import ComponentSpec


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

"""Pipeline families diffship exports, as data.

A family ties diffusers pipeline classes (one per task) to the component specs they are exported as.
A new family (SDXL, say) is one more :class:`Family` entry with its own spec function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from diffship.errors import UnsupportedPipelineError
from diffship.reference.specs import ComponentSpec, stable_diffusion_specs, stable_diffusion_xl_specs

TASKS = ("text2img", "img2img", "inpaint")


@dataclass(frozen=True)
class Family:
    """A family of diffusers pipelines that share components.

    Attributes:
        name: family name recorded in manifests.
        pipelines: diffusers pipeline class name per task.
        modules: pipeline attributes holding the torch modules whose configs feed ``specs``.
        specs: builds the component specs from those modules' configs.
        task_needs: components (or pipeline modules) a task needs beyond the others (an export may omit them).
        extra_channel_tasks: the only tasks of a UNet that takes extra (mask) input channels.
    """

    name: str
    pipelines: dict[str, str]
    modules: tuple[str, ...]
    specs: Callable[[dict[str, dict[str, Any]]], list[ComponentSpec]]
    task_needs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    extra_channel_tasks: tuple[str, ...] = ()

    def tasks_for(self, components: Any, configs: dict[str, dict[str, Any]]) -> list[str]:
        """The tasks an export holding ``components`` of a pipeline with ``configs`` can run.

        A need is met by an exported component or a module the pipeline has (kept in torch by a
        ``--component`` export); the SDXL refiner has no first text encoder, so it cannot do
        text-to-image. A UNet with more input than output channels takes the masked image as extra
        channels: it is an inpainting model and can only inpaint.
        """
        tasks = [t for t in self.pipelines
                 if all(c in components or c in configs for c in self.task_needs.get(t, ()))]
        unet = configs.get("unet", {})
        if unet.get("in_channels", 0) > unet.get("out_channels", 0):
            tasks = [t for t in tasks if t in self.extra_channel_tasks]
        return tasks

    def pipeline_class(self, task: str):
        """The diffusers class for ``task``."""
        import diffusers

        if task not in self.pipelines:
            raise UnsupportedPipelineError(
                f"task {task!r} is not available for {self.name}; choose one of: {', '.join(self.pipelines)}"
            )
        return getattr(diffusers, self.pipelines[task])

    def task_of(self, class_name: str) -> str:
        return next(task for task, name in self.pipelines.items() if name == class_name)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="stable-diffusion",
        pipelines={
            "text2img": "StableDiffusionPipeline",
            "img2img": "StableDiffusionImg2ImgPipeline",
            "inpaint": "StableDiffusionInpaintPipeline",
        },
        modules=("text_encoder", "unet", "vae"),
        specs=stable_diffusion_specs,
        task_needs={"img2img": ("vae_encoder",), "inpaint": ("vae_encoder",)},
        extra_channel_tasks=("inpaint",),
    ),
    # SDXL base and refiner (an img2img pipeline without text_encoder); LCM and turbo UNets alike.
    Family(
        name="stable-diffusion-xl",
        pipelines={
            "text2img": "StableDiffusionXLPipeline",
            "img2img": "StableDiffusionXLImg2ImgPipeline",
            "inpaint": "StableDiffusionXLInpaintPipeline",
        },
        modules=("text_encoder", "text_encoder_2", "unet", "vae"),
        specs=stable_diffusion_xl_specs,
        task_needs={"text2img": ("text_encoder",), "img2img": ("vae_encoder",), "inpaint": ("vae_encoder",)},
        extra_channel_tasks=("inpaint",),
    ),
)


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


def supported_classes() -> list[str]:
    return [name for fam in FAMILIES for name in fam.pipelines.values()]


def family_of(class_name: str) -> Family:
    """The family of a diffusers pipeline class name, or a clear error naming the supported ones."""
    for fam in FAMILIES:
        if class_name in fam.pipelines.values():
            return fam
    raise UnsupportedPipelineError(
        f"pipeline class {class_name!r} is not supported; diffship exports: {', '.join(supported_classes())}"
    )


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

"""Pipeline families diffship exports, as data, and the component specs each is exported as.

A family ties diffusers pipeline classes (one per task) to the specs of its components, built from the
components' configs. A new family is one more :class:`Family` entry with its own spec function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from diffship.errors import UnsupportedPipelineError
from diffship.reference.calls import (flux_transformer_inputs, sd3_transformer_inputs, text_encoder_inputs, unet_inputs,
                                     vae_decoder_inputs, vae_encoder_inputs)
from diffship.reference.shapes import FLOAT
from diffship.reference.specs import ComponentSpec, TensorSpec, vae_scale_factor
from diffship.reference.wrappers import (PENULTIMATE, FluxTransformerWrapper, SD3TransformerWrapper, SDXLUNetWrapper,
                                         TextEncoderWrapper, UNetWrapper, VaeDecoderWrapper, VaeEncoderWrapper)

# --- component specs per family -------------------------------------------------------------------------


def _text_encoder_spec(name: str, config: dict[str, Any], outputs: tuple[str, ...], f: int) -> ComponentSpec:
    """A CLIP text encoder: ``input_ids`` -> ``outputs`` (see :class:`TextEncoderWrapper`)."""
    hidden = config["hidden_size"]
    dims = {"last_hidden_state": ("batch", "sequence", hidden), PENULTIMATE: ("batch", "sequence", hidden),
            "pooler_output": ("batch", hidden), "text_embeds": ("batch", config.get("projection_dim", hidden))}
    return ComponentSpec(
        name=name, source=name,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=tuple(TensorSpec(o, FLOAT, dims[o]) for o in outputs),
        wrapper=partial(TextEncoderWrapper, outputs=outputs), method="forward",
        to_inputs=partial(text_encoder_inputs, hidden=PENULTIMATE in outputs, vocab_size=config.get("vocab_size")),
        scale_factor=f, static_batch=False, config=config,
    )


def _t5_spec(name: str, config: dict[str, Any], f: int, sequence: int) -> ComponentSpec:
    """A T5 encoder: ``input_ids`` -> ``last_hidden_state``, over its own token sequence (``t5_sequence``,
    ``sequence`` tokens by default: the pipeline's ``max_sequence_length``)."""
    return ComponentSpec(
        name=name, source=name,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "t5_sequence")),),
        outputs=(TensorSpec("last_hidden_state", FLOAT, ("batch", "t5_sequence", config["d_model"])),),
        wrapper=partial(TextEncoderWrapper, outputs=("last_hidden_state",)), method="forward",
        to_inputs=partial(text_encoder_inputs, vocab_size=config.get("vocab_size")),
        scale_factor=f, static_batch=False, default_dims={"t5_sequence": sequence}, low_bit_weights=True,
        text_sequence_dims={"t5_sequence": 0}, config=config,
    )


def _unet_spec(unet: dict[str, Any], f: int, added: tuple[TensorSpec, ...] = ()) -> ComponentSpec:
    """The denoiser; ``added`` are SDXL's added conditions. LCM UNets (``time_cond_proj_dim``) also take
    ``timestep_cond``."""
    extra = tuple(added)
    if unet.get("time_cond_proj_dim"):
        extra += (TensorSpec("timestep_cond", FLOAT, ("batch", unet["time_cond_proj_dim"])),)
    return ComponentSpec(
        name="unet", source="unet",
        inputs=(TensorSpec("sample", FLOAT, ("batch", unet["in_channels"], "latent_height", "latent_width")),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", FLOAT, ("batch", "sequence", unet["cross_attention_dim"])),
                *extra),
        outputs=(TensorSpec("out_sample", FLOAT, ("batch", unet["out_channels"], "latent_height", "latent_width")),),
        wrapper=SDXLUNetWrapper if added else UNetWrapper, method="forward",
        to_inputs=partial(unet_inputs, extra=tuple(t.name for t in extra)),
        scale_factor=f, batch_multiplier=2, denoiser=True, config=unet,
        multiples=dict.fromkeys(("latent_height", "latent_width"), 2 ** (len(unet["block_out_channels"]) - 1)),
    )


def _vae_specs(vae: dict[str, Any]) -> list[ComponentSpec]:
    f = vae_scale_factor(vae)
    upcast = bool(vae.get("force_upcast", False))  # diffusers runs the whole VAE in fp32 then
    latent = vae["latent_channels"]
    return [
        ComponentSpec(
            name="vae_encoder", source="vae",
            inputs=(TensorSpec("sample", FLOAT, ("batch", vae.get("in_channels", 3), "height", "width")),),
            outputs=(TensorSpec("latent_parameters", FLOAT, ("batch", 2 * latent, "latent_height", "latent_width")),),
            wrapper=VaeEncoderWrapper, method="encode", to_inputs=vae_encoder_inputs,
            scale_factor=f, keep_fp32=upcast, static_batch=False, config=vae,
        ),
        ComponentSpec(
            name="vae_decoder", source="vae",
            inputs=(TensorSpec("latent_sample", FLOAT, ("batch", latent, "latent_height", "latent_width"),
                               scale=1.0 / vae.get("scaling_factor", 1.0)),),
            outputs=(TensorSpec("sample", FLOAT, ("batch", vae.get("out_channels", 3), "height", "width")),),
            wrapper=VaeDecoderWrapper, method="decode", to_inputs=vae_decoder_inputs,
            scale_factor=f, keep_fp32=upcast, int8_activations=True, config=vae,
        ),
    ]


def stable_diffusion_specs(configs: dict[str, dict[str, Any]]) -> list[ComponentSpec]:
    """Specs of the Stable Diffusion family from the component configs (``text_encoder``, ``unet``, ``vae``).

    Channel counts, hidden sizes and scale factors are read from the configs, so SD 1.x, SD 2.x,
    inpainting UNets (9 input channels) and LCM UNets (``timestep_cond``) get the right shapes.
    """
    f = vae_scale_factor(configs["vae"])
    return [_text_encoder_spec("text_encoder", configs["text_encoder"], ("last_hidden_state", "pooler_output"), f),
            _unet_spec(configs["unet"], f), *_vae_specs(configs["vae"])]


def stable_diffusion_xl_specs(configs: dict[str, dict[str, Any]]) -> list[ComponentSpec]:
    """Specs of the SDXL family (base, refiner) from the component configs.

    Both text encoders give SDXL's conditioning, the penultimate hidden states; ``text_encoder_2``
    also its projected pooled output (``text_embeds``), ``text_encoder`` its pooled output (which SDXL
    does not use, but Apple's Swift pipeline reads, and optimum exports). The refiner has only ``text_encoder_2``. The
    UNet takes ``text_embeds`` and ``time_ids`` (6 size/crop ids, 5 for the refiner's aesthetic score),
    their widths read from its ``projection_class_embeddings_input_dim``.
    """
    unet, te2 = configs["unet"], configs["text_encoder_2"]
    f = vae_scale_factor(configs["vae"])
    pooled = te2.get("projection_dim", te2["hidden_size"])
    time_ids = (unet["projection_class_embeddings_input_dim"] - pooled) // unet["addition_time_embed_dim"]
    specs = []
    if configs.get("text_encoder"):
        specs.append(_text_encoder_spec("text_encoder", configs["text_encoder"],
                                        ("last_hidden_state", PENULTIMATE, "pooler_output"), f))
    specs.append(_text_encoder_spec("text_encoder_2", te2, ("text_embeds", "last_hidden_state", PENULTIMATE), f))
    added = (TensorSpec("text_embeds", FLOAT, ("batch", pooled)), TensorSpec("time_ids", FLOAT, ("batch", time_ids), scale=512.0))
    return [*specs, _unet_spec(unet, f, added), *_vae_specs(configs["vae"])]


#: SD3's default T5 sequence (``max_sequence_length``), part of the transformer's joint text sequence.
SD3_T5_SEQUENCE = 256


def stable_diffusion_3_specs(configs: dict[str, dict[str, Any]]) -> list[ComponentSpec]:
    """Specs of the Stable Diffusion 3 / 3.5 family: two CLIP text encoders with projection (L and G:
    ``text_embeds``, SD3's pooled conditioning, and the penultimate hidden state), the MMDiT transformer
    (SD3.5's qk-norm and dual-attention layers are in its graph), the 16-channel VAE (its shift and
    scaling factors stay in the pipeline).

    The T5 encoder (``text_encoder_3``) is exported where the pipeline has one (diffusers allows it to be
    absent). The transformer's text sequence (``joint_sequence``) is CLIP's tokens followed by the T5
    positions (zeros without T5); static exports fix it at the defaults (77 + 256). Image sizes are dynamic
    (even patches) up to what its positional embedding covers (``pos_embed_max_size`` patches a side).
    """
    tr = configs["transformer"]
    f = vae_scale_factor(configs["vae"])
    clip = ("text_embeds", "last_hidden_state", PENULTIMATE)
    patch = tr.get("patch_size", 2)
    clip_tokens = configs["text_encoder"].get("max_position_embeddings", 77)
    sequence = clip_tokens + SD3_T5_SEQUENCE
    transformer = ComponentSpec(
        name="transformer", source="transformer",
        inputs=(TensorSpec("hidden_states", FLOAT, ("batch", tr["in_channels"], "latent_height", "latent_width")),
                TensorSpec("encoder_hidden_states", FLOAT, ("batch", "joint_sequence", tr["joint_attention_dim"])),
                TensorSpec("pooled_projections", FLOAT, ("batch", tr["pooled_projection_dim"])),
                TensorSpec("timestep", "float32", ("batch",))),
        outputs=(TensorSpec("out_hidden_states", FLOAT,
                            ("batch", tr.get("out_channels") or tr["in_channels"], "latent_height", "latent_width")),),
        wrapper=SD3TransformerWrapper, method="forward", to_inputs=sd3_transformer_inputs,
        scale_factor=f, batch_multiplier=2, denoiser=True, config=tr,
        multiples=dict.fromkeys(("latent_height", "latent_width"), patch), default_dims={"joint_sequence": sequence},
        text_sequence_dims={"joint_sequence": clip_tokens},
        # the graph crops its positional embedding by the input's size; past the embedding's extent the crop
        # comes out short and fails inside the runtime with a broadcast error, so it is refused before
        max_dims=dict.fromkeys(("latent_height", "latent_width"), tr["pos_embed_max_size"] * patch)
        if tr.get("pos_embed_max_size") else {},
    )
    t5 = [_t5_spec("text_encoder_3", configs["text_encoder_3"], f, SD3_T5_SEQUENCE)] if configs.get("text_encoder_3") else []
    return [_text_encoder_spec("text_encoder", configs["text_encoder"], clip, f),
            _text_encoder_spec("text_encoder_2", configs["text_encoder_2"], clip, f), *t5,
            transformer, *_vae_specs(configs["vae"])]


#: FLUX.1-dev's default T5 sequence (``max_sequence_length``; schnell's is 256).
FLUX_T5_SEQUENCE = 512


def flux_specs(configs: dict[str, dict[str, Any]]) -> list[ComponentSpec]:
    """Specs of the Flux family (FLUX.1-dev with its guidance embedding, schnell without): CLIP-L for the
    pooled conditioning (``pooler_output``), the T5 encoder (``text_encoder_2``), the transformer over
    packed latents, the 16-channel VAE (shift and scaling factors stay in the pipeline).

    The transformer's image tokens (``image_sequence``: 2x2 latent pixels each) and text tokens
    (``text_sequence``, the T5 sequence) are dynamic; its rotary embedding comes from the ``img_ids`` and
    ``txt_ids`` inputs, so any size the pipeline packs (multiples of twice the VAE factor) runs.
    """
    tr, f = configs["transformer"], vae_scale_factor(configs["vae"])
    tokens = ("image_sequence", "text_sequence")
    inputs = [TensorSpec("hidden_states", FLOAT, ("batch", tokens[0], tr["in_channels"])),
              TensorSpec("encoder_hidden_states", FLOAT, ("batch", tokens[1], tr["joint_attention_dim"])),
              TensorSpec("pooled_projections", FLOAT, ("batch", tr["pooled_projection_dim"])),
              # timesteps and guidance as the pipeline passes them (t / 1000; the model scales them back)
              TensorSpec("timestep", "float32", ("batch",), scale=1e-3),
              TensorSpec("img_ids", "float32", (tokens[0], 3)), TensorSpec("txt_ids", "float32", (tokens[1], 3))]
    if tr.get("guidance_embeds"):
        inputs.append(TensorSpec("guidance", "float32", ("batch",), scale=3.5))
    transformer = ComponentSpec(
        name="transformer", source="transformer", inputs=tuple(inputs),
        outputs=(TensorSpec("out_hidden_states", FLOAT, ("batch", tokens[0], tr.get("out_channels") or tr["in_channels"])),),
        wrapper=FluxTransformerWrapper, method="forward",
        to_inputs=partial(flux_transformer_inputs, guidance=bool(tr.get("guidance_embeds"))),
        scale_factor=f, denoiser=True, config=tr, packed={tokens[0]: 2},
        multiples=dict.fromkeys(("latent_height", "latent_width"), 2), default_dims={tokens[1]: FLUX_T5_SEQUENCE},
        text_sequence_dims={tokens[1]: 0},
    )
    return [_text_encoder_spec("text_encoder", configs["text_encoder"], ("last_hidden_state", "pooler_output"), f),
            _t5_spec("text_encoder_2", configs["text_encoder_2"], f, FLUX_T5_SEQUENCE), transformer,
            *_vae_specs(configs["vae"])]


# --- families -------------------------------------------------------------------------------------------

TASKS = ("text2img", "img2img", "inpaint")


@dataclass(frozen=True)
class Family:
    """A family of diffusers pipelines that share components.

    Attributes:
        name: family name recorded in manifests.
        pipelines: diffusers pipeline class name per task.
        modules: pipeline attributes holding the torch modules whose configs feed ``specs``, each with the
            (library, class) it must be: a source whose ``text_encoder`` is another architecture is refused.
        specs: builds the component specs from those modules' configs.
        library: the other pipeline attributes a source or export may hold (tokenizers, scheduler,
            feature extractor), each with its library and the base class its class must derive from;
            nothing else named in an export's ``model_index.json`` is ever imported.
        task_needs: components (or pipeline modules) a task needs beyond the others (an export may omit them).
        extra_channel_tasks: the only tasks of a UNet that takes extra (mask) input channels.
        dynamic_tasks: tasks whose requests add reference-image tokens beside the image's (FLUX.1 Kontext's
            inpainting uses the image itself as its reference): a fixed-shape export cannot run them.
    """

    name: str
    pipelines: dict[str, str]
    modules: dict[str, tuple[str, str]]
    specs: Callable[[dict[str, dict[str, Any]]], list[ComponentSpec]]
    library: dict[str, tuple[str, str]] = field(default_factory=dict)
    task_needs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    extra_channel_tasks: tuple[str, ...] = ()
    dynamic_tasks: tuple[str, ...] = ()

    def tasks_for(self, components: Any, configs: dict[str, dict[str, Any]], fixed_shapes: bool = False) -> list[str]:
        """The tasks an export holding ``components`` of a pipeline with ``configs`` can run.

        A need is met by an exported component or a module the pipeline has (kept in torch by a
        ``--component`` export); the SDXL refiner has no first text encoder, so it cannot do
        text-to-image. A denoiser (UNet, Flux Fill's transformer) with more input than output channels takes
        the masked image as extra channels: it is an inpainting model and can only inpaint. An export
        with ``fixed_shapes`` runs none of the ``dynamic_tasks``.
        """
        tasks = [t for t in self.pipelines
                 if all(c in components or c in configs for c in self.task_needs.get(t, ()))]
        denoiser = configs.get("unet") or configs.get("transformer") or {}
        if denoiser.get("in_channels", 0) > (denoiser.get("out_channels") or denoiser.get("in_channels", 0)):
            tasks = [t for t in tasks if t in self.extra_channel_tasks]
        if fixed_shapes:
            tasks = [t for t in tasks if t not in self.dynamic_tasks]
        return tasks

    def component_class(self, name: str, entry: Any) -> type:
        """The class ``model_index.json`` names as ``entry`` (``[library, class]``) for the pipeline attribute
        ``name``, if the family allows it there: one of its torch modules as its declared class (kept in
        torch by a ``--component`` export), or a library component derived from the allowed base.

        Raises:
            UnsupportedPipelineError: another library or class (custom code in a model folder is never
                imported).
        """
        import importlib

        library, class_name = (list(entry) + [None, None])[:2] if isinstance(entry, (list, tuple)) else (None, None)
        found = None
        if name in self.modules:
            allowed = self.modules[name]
            if [library, class_name] == list(allowed):
                found = getattr(importlib.import_module(library), class_name)
            what = f"a {allowed[0]}.{allowed[1]}"
        elif name in self.library:
            allowed = self.library[name]
            if library == allowed[0]:
                module = importlib.import_module(library)
                candidate = getattr(module, str(class_name), None)
                if isinstance(candidate, type) and issubclass(candidate, getattr(module, allowed[1])):
                    found = candidate
            what = f"a {allowed[1]} from {allowed[0]}"
        else:
            what = "nothing (not a component of this family)"
        if found is None:
            raise UnsupportedPipelineError(
                f"model_index.json names {library}.{class_name} for {name!r}, where a {self.name} pipeline takes "
                f"{what}; diffship imports no other code from a model folder")
        return found

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


_TOKENIZER = ("transformers", "PreTrainedTokenizerBase")
_LIBRARY = {"tokenizer": _TOKENIZER, "scheduler": ("diffusers", "SchedulerMixin"),
            "feature_extractor": ("transformers", "ImageProcessingMixin")}
_CLIP = ("transformers", "CLIPTextModel")
_UNET_VAE = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL")}
_CLIP_PROJECTION = ("transformers", "CLIPTextModelWithProjection")

#: what the Flux families share: their modules, specs and library classes.
_FLUX_PARTS = dict(
    modules={"text_encoder": _CLIP, "text_encoder_2": ("transformers", "T5EncoderModel"),
             "transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL")},
    specs=flux_specs, library={**_LIBRARY, "tokenizer_2": _TOKENIZER},
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="stable-diffusion",
        pipelines={
            "text2img": "StableDiffusionPipeline",
            "img2img": "StableDiffusionImg2ImgPipeline",
            "inpaint": "StableDiffusionInpaintPipeline",
        },
        modules={"text_encoder": _CLIP, **_UNET_VAE},
        specs=stable_diffusion_specs,
        library=_LIBRARY,
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
        modules={"text_encoder": _CLIP, "text_encoder_2": _CLIP_PROJECTION, **_UNET_VAE},
        specs=stable_diffusion_xl_specs,
        library={**_LIBRARY, "tokenizer_2": _TOKENIZER},
        task_needs={"text2img": ("text_encoder",), "img2img": ("vae_encoder",), "inpaint": ("vae_encoder",)},
        extra_channel_tasks=("inpaint",),
    ),
    # Stable Diffusion 3 / 3.5 (MMDiT), flow matching.
    Family(
        name="stable-diffusion-3",
        pipelines={
            "text2img": "StableDiffusion3Pipeline",
            "img2img": "StableDiffusion3Img2ImgPipeline",
            "inpaint": "StableDiffusion3InpaintPipeline",
        },
        modules={"text_encoder": _CLIP_PROJECTION, "text_encoder_2": _CLIP_PROJECTION,
                 "text_encoder_3": ("transformers", "T5EncoderModel"),
                 "transformer": ("diffusers", "SD3Transformer2DModel"), "vae": ("diffusers", "AutoencoderKL")},
        specs=stable_diffusion_3_specs,
        library={**_LIBRARY, "tokenizer_2": _TOKENIZER, "tokenizer_3": _TOKENIZER},
        task_needs={"img2img": ("vae_encoder",), "inpaint": ("vae_encoder",)},
        extra_channel_tasks=("inpaint",),
    ),
    # FLUX.1 dev and schnell (guidance-distilled: no classifier-free guidance batch), flow matching with
    # the resolution-dependent shift.
    Family(name="flux", **_FLUX_PARTS,
           pipelines={"text2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"},
           task_needs={"img2img": ("vae_encoder",), "inpaint": ("vae_encoder",)}),
    # FLUX.1 Fill: the same transformer export with the masked image's latents and the mask packed into
    # extra input channels (384 in, 64 out for FLUX.1-Fill-dev): it only inpaints (and outpaints).
    Family(name="flux-fill", **_FLUX_PARTS, pipelines={"inpaint": "FluxFillPipeline"},
           task_needs={"inpaint": ("vae_encoder",)}, extra_channel_tasks=("inpaint",)),
    # FLUX.1 Kontext: the same transformer export; a reference image's packed latents follow the image tokens
    # in ``image_sequence`` (their ids in ``img_ids``), so dynamic-shape exports take it as they are, and a
    # fixed-shape export (Core ML, --static) takes text-to-image requests without one, and no inpainting (whose
    # reference is the image itself).
    Family(name="flux-kontext", **_FLUX_PARTS,
           pipelines={"text2img": "FluxKontextPipeline", "inpaint": "FluxKontextInpaintPipeline"},
           task_needs={"inpaint": ("vae_encoder",)}, dynamic_tasks=("inpaint",)),
)


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

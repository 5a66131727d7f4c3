"""Component specs: what gets exported, as data.

A :class:`ComponentSpec` names a component's inputs and outputs (IO names compatible with optimum's
ONNX exports), their dtypes and symbolic dims, the small wrapper ``nn.Module`` that is traced, and how
a diffusers-style call on the eager module maps onto the spec's inputs. The same mapping serves the
runtime adapters (diffusers call -> exported model inputs) and parity recording (eager call -> inputs
to replay), so the two can never disagree.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from diffship.errors import ShapeError

#: dtype names used in specs; ``float`` follows the export precision, ``float32`` never does.
FLOAT = "float"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32}
#: torch dtype of the traced module per export precision; weight-only formats (int8) trace in fp32.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor.

    Attributes:
        name: IO name in the exported model.
        dtype: ``"float"`` (follows the export precision), ``"float32"`` or ``"int64"``.
        dims: per axis, a fixed size or the name of a symbolic dim (``batch``, ``height``, ``width``,
            ``latent_height``, ``latent_width``, ``sequence``).
        scale: standard deviation of realistic values, for example inputs (decoder latents are
            divided by the VAE's scaling factor, so they are ~5x larger than unit noise).
    """

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    scale: float = 1.0

    def torch_dtype(self, precision: str = "fp32") -> torch.dtype:
        """The concrete dtype of this tensor in an export of ``precision``."""
        return PRECISIONS.get(precision, torch.float32) if self.dtype == FLOAT else TORCH_DTYPES[self.dtype]

    def shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for the symbolic dim values ``dims``."""
        return tuple(d if isinstance(d, int) else dims[d] for d in self.dims)

    def to_dict(self, precision: str = "fp32") -> dict[str, Any]:
        return {"name": self.name, "dtype": str(self.torch_dtype(precision)).removeprefix("torch."),
                "dims": list(self.dims)}


def parse_hw(item: Any, what: str = "size") -> tuple[int, int]:
    """``"512x768"`` (or ``(512, 768)``) -> ``(512, 768)``: height, width. Values are not range-checked."""
    try:
        height, width = (int(v) for v in (item.lower().split("x") if isinstance(item, str) else item))
    except (ValueError, TypeError, AttributeError):
        raise ShapeError(f"{what} {item!r} is not HEIGHTxWIDTH, e.g. 512x512") from None
    return height, width


@dataclass(frozen=True)
class ShapeProfile:
    """The request shape a component is traced, built or checked for.

    Attributes:
        batch_size: images per call of the pipeline (prompts x images per prompt).
        height: image height in pixels.
        width: image width in pixels.
        sequence_length: token sequence length (the tokenizer's ``model_max_length``).
        guidance: whether classifier-free guidance doubles the UNet batch.
    """

    batch_size: int = 1
    height: int = 512
    width: int = 512
    sequence_length: int = 77
    guidance: bool = True

    def validate(self, scale_factor: int) -> None:
        """Raise :class:`ShapeError` unless the sizes are positive multiples of ``scale_factor``."""
        if self.batch_size < 1:
            raise ShapeError(f"batch size must be at least 1, got {self.batch_size}")
        for name, size in (("height", self.height), ("width", self.width)):
            if size < scale_factor or size % scale_factor:
                raise ShapeError(
                    f"{name} {size} is not a positive multiple of {scale_factor} (the VAE's scale factor); "
                    f"use e.g. {max(scale_factor, size // scale_factor * scale_factor)}"
                )

    def dims(self, scale_factor: int, batch_multiplier: int = 1) -> dict[str, int]:
        """Values of the symbolic dims for one component."""
        return {
            "batch": self.batch_size * batch_multiplier,
            "height": self.height,
            "width": self.width,
            "latent_height": self.height // scale_factor,
            "latent_width": self.width // scale_factor,
            "sequence": self.sequence_length,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "height": self.height, "width": self.width,
                "sequence_length": self.sequence_length, "guidance": self.guidance}


#: (min, opt, max) of one request dimension.
Range = tuple[int, int, int]


def span(r: Range) -> str:
    """``"4"`` for a fixed range, ``"1-4"`` otherwise."""
    return str(r[0]) if r[0] == r[2] else f"{r[0]}-{r[2]}"


@dataclass(frozen=True)
class ShapeRange:
    """A range of request shapes one engine serves (a TensorRT optimization profile), in user terms.

    Attributes:
        batch: (min, opt, max) images per pipeline call (prompts x images per prompt).
        height: (min, opt, max) image height in pixels.
        width: (min, opt, max) image width in pixels.
        sequence_length: token sequence length (fixed).
        guidance: whether requests use classifier-free guidance, which doubles the denoiser's batch.
    """

    batch: Range
    height: Range
    width: Range
    sequence_length: int = 77
    guidance: bool = True

    @classmethod
    def fixed(cls, profile: ShapeProfile) -> "ShapeRange":
        """The one shape of ``profile`` (a static engine)."""
        return cls(batch=(profile.batch_size,) * 3, height=(profile.height,) * 3, width=(profile.width,) * 3,
                   sequence_length=profile.sequence_length, guidance=profile.guidance)

    @property
    def is_fixed(self) -> bool:
        return all(r[0] == r[2] for r in (self.batch, self.height, self.width))

    def validate(self, size_multiple: int) -> None:
        """Raise :class:`ShapeError` unless min <= opt <= max, batches are >= 1 and sizes are multiples
        of ``size_multiple`` (the image sizes the exported UNet takes)."""
        for name, r in (("batch", self.batch), ("height", self.height), ("width", self.width)):
            if len(r) != 3 or not r[0] <= r[1] <= r[2]:
                raise ShapeError(f"profile {name} {list(r)} is not [min, opt, max] with min <= opt <= max")
            if r[0] < 1:
                raise ShapeError(f"profile {name} {list(r)} must be at least 1")
            if name != "batch" and any(v % size_multiple for v in r):
                bad = next(v for v in r if v % size_multiple)
                raise ShapeError(f"profile {name} {list(r)}: {bad} is not a multiple of {size_multiple}, the image "
                                 f"sizes this model's UNet takes (e.g. {max(size_multiple, bad // size_multiple * size_multiple)})")

    def describe(self) -> str:
        """e.g. ``"1-4 images of 256-1024 x 256-1024 px"``."""
        return f"{span(self.batch)} image(s) of {span(self.height)} x {span(self.width)} px"

    def to_dict(self) -> dict[str, Any]:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width),
                "sequence_length": self.sequence_length, "guidance": self.guidance}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShapeRange":
        return cls(batch=tuple(data["batch"]), height=tuple(data["height"]), width=tuple(data["width"]),
                   sequence_length=data.get("sequence_length", 77), guidance=data.get("guidance", True))


@dataclass(frozen=True)
class ComponentSpec:
    """Everything needed to export, run and check one pipeline component.

    Attributes:
        name: component name in the export (``unet``, ``vae_decoder``...).
        source: attribute of the diffusers pipeline that holds the eager module.
        inputs: input tensors, in the exported model's order.
        outputs: output tensors.
        wrapper: builds the ``nn.Module`` that is exported from the eager module.
        method: the eager module's method whose calls map to this component (``forward``, ``encode``,
            ``decode``).
        to_inputs: maps a bound call of ``method`` (its ``inspect.BoundArguments.arguments``) to the
            spec's input tensors; use :meth:`inputs_for_call`.
        scale_factor: the VAE's spatial scale factor (latent -> pixels).
        batch_multiplier: how many rows of the component's batch one image takes under guidance.
        keep_fp32: export this component in fp32 even in an fp16 export (known to overflow).
        denoiser: called once per denoising step -- the compute bottleneck, where activation
            quantization pays off (calibrated precisions apply to it).
        multiples: symbolic dims whose sizes the exported graph only handles in multiples (the UNet
            interpolates odd sizes in eager mode, a branch tracing fixes); checked by the adapters.
        static_batch: whether a static export fixes the batch too. diffusers calls the text encoder
            once per prompt list and the VAE encoder once per init image, whatever the number of
            images, so their batch stays dynamic; the UNet and decoder batches are fixed.
    """

    name: str
    source: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrapper: Callable[[nn.Module], nn.Module]
    method: str
    to_inputs: Callable[[dict[str, Any]], dict[str, torch.Tensor]]
    scale_factor: int = 8
    batch_multiplier: int = 1
    keep_fp32: bool = False
    denoiser: bool = False
    multiples: dict[str, int] = field(default_factory=dict)
    static_batch: bool = True
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    def check_multiples(self, inputs: dict[str, torch.Tensor]) -> None:
        """Raise :class:`ShapeError` for sizes the exported graph does not handle (see ``multiples``)."""
        for t in self.inputs:
            for dim, size in zip(t.dims, inputs[t.name].shape):
                m = self.multiples.get(dim) if isinstance(dim, str) else None
                if m and size % m:
                    raise ShapeError(
                        f"{self.name}: {dim} {size} is not a multiple of {m}; exported graphs take image sizes "
                        f"that are multiples of {m * self.scale_factor} (e.g. {size // m * m * self.scale_factor} "
                        f"or {(size // m + 1) * m * self.scale_factor})"
                    )

    def symbolic_dims(self, static: bool) -> set[str]:
        """The dims left symbolic in an export: all of them, or when ``static`` only an unfixed batch."""
        names = {d for t in (*self.inputs, *self.outputs) for d in t.dims if isinstance(d, str)}
        if static:
            return names & ({"batch"} if not self.static_batch else set())
        return names

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dims(self, profile: ShapeProfile) -> dict[str, int]:
        """Symbolic dim values of this component for ``profile``."""
        return profile.dims(self.scale_factor, self.batch_multiplier if profile.guidance else 1)

    def input_ranges(self, shapes: ShapeRange) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of each input over the requests ``shapes`` describes.

        Guidance doubling: the denoiser's batch runs from ``batch[0]`` (a call without guidance) to twice
        ``batch[2]``, unless the range is fixed, when it is exactly what the requests give. Components
        diffusers calls once per prompt list or init image (``static_batch`` False) take 1 to ``batch[2]``.
        """
        points = [ShapeProfile(batch_size=shapes.batch[i], height=shapes.height[i], width=shapes.width[i],
                               sequence_length=shapes.sequence_length, guidance=shapes.guidance) for i in range(3)]
        dims = [self.dims(p) for p in points]
        if not shapes.is_fixed and self.batch_multiplier > 1:
            dims[0]["batch"] = shapes.batch[0]
        if not self.static_batch:
            for d, b in zip(dims, (1, 1, shapes.batch[2])):
                d["batch"] = b
        return {t.name: tuple(t.shape(d) for d in dims) for t in self.inputs}

    def example_inputs(self, profile: ShapeProfile, precision: str = "fp32", seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded example inputs of the right names, dtypes and shapes for ``profile``."""
        gen = torch.Generator().manual_seed(seed)
        dims = self.dims(profile)
        out = {}
        for t in self.inputs:
            shape, dtype = t.shape(dims), t.torch_dtype(precision)
            if dtype in (torch.int64, torch.int32):
                high = int(self.config.get("vocab_size", 1000))
                out[t.name] = torch.randint(0, high, shape, generator=gen, dtype=dtype)
            elif t.name == "timestep":
                out[t.name] = torch.full(shape, 500.0, dtype=dtype)
            else:
                out[t.name] = (torch.randn(shape, generator=gen) * t.scale).to(dtype)
        return out

    def inputs_for_call(self, method: Callable, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """Map a diffusers-style call ``method(*args, **kwargs)`` to this spec's input tensors.

        ``method`` is the eager module's method (or an adapter's, which has the same signature).
        """
        sig = inspect.signature(method)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise ShapeError(f"{self.name}: {exc}") from None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        # Flatten **kwargs (transformers 5 takes output_hidden_states & co. that way).
        for name, param in sig.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        return self.to_inputs(arguments)


# --- wrapper modules: the exact graphs that get exported -------------------------------------------------


class TextEncoderWrapper(nn.Module):
    """``input_ids -> outputs`` of a CLIP text model, named as in ``outputs``: ``last_hidden_state``,
    ``pooler_output``, ``text_embeds`` (``CLIPTextModelWithProjection``) and ``penultimate_hidden_state``
    (``hidden_states[-2]``, the embeddings SDXL conditions on)."""

    def __init__(self, text_encoder: nn.Module, outputs: tuple[str, ...] = ("last_hidden_state", "pooler_output")):
        super().__init__()
        self.text_encoder = text_encoder
        self.outputs = outputs

    def forward(self, input_ids: torch.Tensor):
        hidden = PENULTIMATE in self.outputs
        out = self.text_encoder(input_ids, output_hidden_states=hidden, return_dict=True)
        return tuple(out.hidden_states[-2] if name == PENULTIMATE else out[name] for name in self.outputs)


#: the text-encoder output holding ``hidden_states[-2]``.
PENULTIMATE = "penultimate_hidden_state"


class UNetWrapper(nn.Module):
    """``(sample, timestep, encoder_hidden_states[, timestep_cond]) -> out_sample``; ``timestep_cond`` is
    the guidance embedding of LCM-distilled UNets (``time_cond_proj_dim``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class SDXLUNetWrapper(nn.Module):
    """``(sample, timestep, encoder_hidden_states, text_embeds, time_ids[, timestep_cond]) -> out_sample``:
    the SDXL UNet with its added conditions (pooled text embeddings, size and crop ids)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, timestep_cond: torch.Tensor | None = None):
        # diffusers concatenates text_embeds with the float32 time-id embedding, which torch promotes to
        # float32; the ONNX exporter would emit a Concat of mixed types instead, so promote explicitly.
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs={"text_embeds": text_embeds.float(), "time_ids": time_ids},
                         return_dict=False)[0]


class VaeEncoderWrapper(nn.Module):
    """``sample -> latent_parameters`` (mean and log-variance); sampling stays on the host."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor):
        return self.vae.encode(sample, return_dict=True).latent_dist.parameters


class VaeDecoderWrapper(nn.Module):
    """``latent_sample -> sample`` (image in [-1, 1], unclamped)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor):
        return self.vae.decode(latent_sample, return_dict=False)[0]


# --- call mapping -----------------------------------------------------------------------------------------


def _text_encoder_inputs(a: dict[str, Any], hidden: bool = False) -> dict[str, torch.Tensor]:
    mask = a.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise ShapeError("text_encoder: exported text encoders take no attention mask (CLIP does not use one); "
                         "pass attention_mask=None")
    if a.get("output_hidden_states") and not hidden:
        raise ShapeError("text_encoder: this export has no hidden-state outputs, so clip_skip is not supported; "
                         "call without clip_skip")
    return {"input_ids": torch.as_tensor(a["input_ids"]).to(torch.int64)}


#: UNet call arguments an exported graph can take as inputs, and where diffusers passes them.
_ADDED = {"text_embeds": "added_cond_kwargs", "time_ids": "added_cond_kwargs", "timestep_cond": "timestep_cond"}


def _unet_inputs(a: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    # The exported graph cannot honour these; refusing beats silently returning a different result.
    # (An empty cross_attention_kwargs dict changes nothing, so it passes.)
    takes = {_ADDED[name] for name in extra}
    unsupported = [k for k in ("class_labels", "timestep_cond", "added_cond_kwargs", "down_block_additional_residuals",
                               "mid_block_additional_residual", "down_intrablock_additional_residuals",
                               "encoder_attention_mask", "attention_mask", "cross_attention_kwargs")
                   if k not in takes and a.get(k) is not None and not (k in ("cross_attention_kwargs", "added_cond_kwargs") and not a[k])]
    if unsupported:
        raise ShapeError(f"unet: this export does not take {', '.join(unsupported)}; call without them")
    sample = a["sample"]
    t = torch.as_tensor(a["timestep"], dtype=torch.float32)
    if t.ndim == 0 or t.numel() == 1:
        t = t.reshape(1).expand(sample.shape[0])
    out = {"sample": sample, "timestep": t.contiguous(), "encoder_hidden_states": a["encoder_hidden_states"]}
    for name in extra:
        value = a.get(name) if _ADDED[name] == name else (a.get(_ADDED[name]) or {}).get(name)
        if value is None:
            raise ShapeError(f"unet: this export needs {name} (passed as {_ADDED[name]}); "
                             f"the UNet it was exported from takes it")
        out[name] = value
    return out


def _vae_encoder_inputs(a: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"sample": a["x"]}


def _vae_decoder_inputs(a: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"latent_sample": a["z"]}


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def size_multiple(specs: list[ComponentSpec]) -> int:
    """The image sizes (pixels) every component of a pipeline takes are multiples of this: the VAE
    factor times the latent multiple the UNet needs (64 for SD)."""
    return max([s.scale_factor * m for s in specs for m in s.multiples.values()] + [s.scale_factor for s in specs])


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
        to_inputs=partial(_text_encoder_inputs, hidden=PENULTIMATE in outputs),
        scale_factor=f, static_batch=False, config=config,
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
        to_inputs=partial(_unet_inputs, extra=tuple(t.name for t in extra)),
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
            wrapper=VaeEncoderWrapper, method="encode", to_inputs=_vae_encoder_inputs,
            scale_factor=f, keep_fp32=upcast, static_batch=False, config=vae,
        ),
        ComponentSpec(
            name="vae_decoder", source="vae",
            inputs=(TensorSpec("latent_sample", FLOAT, ("batch", latent, "latent_height", "latent_width"),
                               scale=1.0 / vae.get("scaling_factor", 1.0)),),
            outputs=(TensorSpec("sample", FLOAT, ("batch", vae.get("out_channels", 3), "height", "width")),),
            wrapper=VaeDecoderWrapper, method="decode", to_inputs=_vae_decoder_inputs,
            scale_factor=f, keep_fp32=upcast, config=vae,
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
    also its projected pooled output (``text_embeds``). The refiner has only ``text_encoder_2``. The
    UNet takes ``text_embeds`` and ``time_ids`` (6 size/crop ids, 5 for the refiner's aesthetic score),
    their widths read from its ``projection_class_embeddings_input_dim``.
    """
    unet, te2 = configs["unet"], configs["text_encoder_2"]
    f = vae_scale_factor(configs["vae"])
    pooled = te2.get("projection_dim", te2["hidden_size"])
    time_ids = (unet["projection_class_embeddings_input_dim"] - pooled) // unet["addition_time_embed_dim"]
    specs = []
    if configs.get("text_encoder"):
        specs.append(_text_encoder_spec("text_encoder", configs["text_encoder"], ("last_hidden_state", PENULTIMATE), f))
    specs.append(_text_encoder_spec("text_encoder_2", te2, ("text_embeds", "last_hidden_state", PENULTIMATE), f))
    added = (TensorSpec("text_embeds", FLOAT, ("batch", pooled)), TensorSpec("time_ids", FLOAT, ("batch", time_ids), scale=512.0))
    return [*specs, _unet_spec(unet, f, added), *_vae_specs(configs["vae"])]

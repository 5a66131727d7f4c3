"""Component specs: what gets exported, as data.

A :class:`ComponentSpec` names a component's inputs and outputs (IO names compatible with optimum's
ONNX exports), their dtypes and symbolic dims, the small wrapper ``nn.Module`` that is traced
(:mod:`~diffship.reference.wrappers`), and how a diffusers-style call on the eager module maps onto the
spec's inputs (:mod:`~diffship.reference.calls`). The same mapping serves the runtime adapters
(diffusers call -> exported model inputs) and parity recording (eager call -> inputs to replay), so
the two can never disagree; :meth:`ComponentSpec.eager` is the one way to run the eager component.
The specs of each pipeline family are built in :mod:`~diffship.reference.families`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from diffship.errors import ShapeError
from diffship.reference.shapes import FLOAT, PRECISIONS, TORCH_DTYPES, ShapeProfile, ShapeRange


#: example values of inputs that hold one level per batch row (times the spec's ``scale``): a mid-range
#: timestep (Flux passes t / 1000: scale 0.001) and guidance scale.
_LEVELS = {"timestep": 500.0, "guidance": 1.0}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor.

    Attributes:
        name: IO name in the exported model.
        dtype: ``"float"`` (follows the export precision), ``"float32"`` or ``"int64"``.
        dims: per axis, a fixed size or the name of a symbolic dim (``batch``, ``height``, ``width``,
            ``latent_height``, ``latent_width``, ``sequence``).
        scale: standard deviation of realistic values, for example inputs (decoder latents are
            divided by the VAE's scaling factor, so they are ~5x larger than unit noise); for a
            timestep or guidance input, the factor on its example level.
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

    def dtype_name(self, precision: str = "fp32") -> str:
        """numpy's name of this tensor's dtype in an export of ``precision`` (``float16``, ``int64``)."""
        return str(self.torch_dtype(precision)).removeprefix("torch.")


class IONames:
    """``input_names`` and ``output_names`` of anything with named ``inputs`` and ``outputs`` (a spec, a
    manifest entry)."""

    inputs: tuple
    outputs: tuple

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class ComponentSpec(IONames):
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
        max_dims: the largest size of symbolic dims the model takes (SD3's transformer crops its positional
            embedding from a ``pos_embed_max_size`` square of patches); larger requests are refused by name.
        default_dims: sizes of symbolic dims a request shape does not give, at the pipeline's defaults
            (SD3's joint text sequence: CLIP's 77 tokens + ``max_sequence_length`` T5 positions).
        low_bit_weights: 4-bit weight formats apply besides the denoiser (T5: billions of matrix-product
            weights; CLIP's few and the VAE's convolutions stay 8-bit, where 4 bits cost more than they save).
        packed: ``{dim: patch}``: dims counting the image's patches of ``patch`` x ``patch`` latent pixels
            (Flux packs 2x2 latent pixels into one token: ``image_sequence``).
        text_sequence_dims: ``{dim: offset}``: symbolic dims that are the T5 sequence length plus ``offset``
            (T5's ``t5_sequence``; SD3's ``joint_sequence``: CLIP's 77 tokens first; Flux's ``text_sequence``):
            what a range of T5 sequence lengths changes (TensorRT profiles).
        int8_activations: ``full-int8`` quantizes its activations as well as the denoiser's, kept only where
            its outputs pass (the VAE decoder: at small images one decode costs more than a denoiser call).
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
    max_dims: dict[str, int] = field(default_factory=dict)
    default_dims: dict[str, int] = field(default_factory=dict)
    packed: dict[str, int] = field(default_factory=dict)
    low_bit_weights: bool = False
    int8_activations: bool = False
    text_sequence_dims: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    def check_sizes(self, inputs: dict[str, torch.Tensor]) -> None:
        """Raise :class:`ShapeError` for sizes the exported graph does not handle (see ``multiples`` and
        ``max_dims``)."""
        for t in self.inputs:
            for dim, size in zip(t.dims, inputs[t.name].shape):
                m = self.multiples.get(dim) if isinstance(dim, str) else None
                if m and size % m:
                    raise ShapeError(
                        f"{self.name}: {dim} {size} is not a multiple of {m}; exported graphs take image sizes "
                        f"that are multiples of {m * self.scale_factor} (e.g. {size // m * m * self.scale_factor} "
                        f"or {(size // m + 1) * m * self.scale_factor})"
                    )
        self.check_dims({d: size for t in self.inputs for d, size in zip(t.dims, inputs[t.name].shape)
                         if isinstance(d, str)})

    def check_dims(self, dims: dict[str, int]) -> None:
        """Raise :class:`ShapeError` where a dim is over its ``max_dims`` (named with the image size it means)."""
        for dim, size in dims.items():
            top = self.max_dims.get(dim)
            if top is not None and size > top:
                side = top * self.scale_factor if dim.startswith("latent_") else top
                raise ShapeError(f"{self.name}: {dim} {size} is over {top}, the most this model takes (its "
                                 f"positional embedding's extent); use images of at most {side} px a side")

    def symbolic_dims(self, static: bool) -> set[str]:
        """The dims left symbolic in an export: all of them, or when ``static`` only an unfixed batch."""
        names = {d for t in (*self.inputs, *self.outputs) for d in t.dims if isinstance(d, str)}
        if static:
            return names & ({"batch"} if not self.static_batch else set())
        return names

    def dims(self, profile: ShapeProfile) -> dict[str, int]:
        """Symbolic dim values of this component for ``profile``."""
        dims = {**self.default_dims, **profile.dims(self.scale_factor, self.batch_multiplier if profile.guidance else 1)}
        for name, patch in self.packed.items():
            dims[name] = (dims["latent_height"] // patch) * (dims["latent_width"] // patch)
        return dims

    def input_ranges(self, shapes: ShapeRange) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of each input over the requests ``shapes`` describes.

        Guidance doubling: the denoiser's batch runs from ``batch[0]`` (a call without guidance) to twice
        ``batch[2]``, unless the range is fixed, when it is exactly what the requests give. Components
        diffusers calls once per prompt list or init image (``static_batch`` False) take 1 to ``batch[2]``.
        A range of T5 sequence lengths sets the ``text_sequence_dims``.
        """
        points = [ShapeProfile(batch_size=shapes.batch[i], height=shapes.height[i], width=shapes.width[i],
                               sequence_length=shapes.sequence_length, guidance=shapes.guidance) for i in range(3)]
        dims = [self.dims(p) for p in points]
        if not shapes.is_fixed and self.batch_multiplier > 1:
            dims[0]["batch"] = shapes.batch[0]
        if not self.static_batch:
            for d, b in zip(dims, (1, 1, shapes.batch[2])):
                d["batch"] = b
        if shapes.text_sequence is not None:
            for d, length in zip(dims, shapes.text_sequence):
                d.update({name: offset + length for name, offset in self.text_sequence_dims.items()})
        return {t.name: tuple(t.shape(d) for d in dims) for t in self.inputs}

    def default_text_sequence(self) -> int | None:
        """The T5 sequence length its default dims imply, or None where it has none."""
        return next((self.default_dims[name] - offset for name, offset in self.text_sequence_dims.items()
                     if name in self.default_dims), None)

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
            elif t.name in _LEVELS:  # one value per row, mid-range
                out[t.name] = torch.full(shape, _LEVELS[t.name] * t.scale, dtype=dtype)
            else:
                out[t.name] = (torch.randn(shape, generator=gen) * t.scale).to(dtype)
        return out

    def named_outputs(self, value: Any) -> dict[str, torch.Tensor]:
        """A wrapper's return value (one tensor, or a tuple in ``outputs`` order) by output name."""
        values = (value,) if isinstance(value, torch.Tensor) else tuple(value)
        return dict(zip(self.output_names, values))

    def eager(self, module: nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The eager component as a function of its spec-named inputs, returning its outputs by name:
        the wrapper that is exported, run under ``torch.inference_mode``. Parity replays recorded
        inputs through it; benchmarks time it."""
        wrapper = self.wrapper(module).eval()

        def call(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.inference_mode():
                return self.named_outputs(wrapper(*(inputs[n] for n in self.input_names)))

        return call

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


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def size_multiple(specs: list[ComponentSpec]) -> int:
    """The image sizes (pixels) every component of a pipeline takes are multiples of this: the VAE
    factor times the latent multiple the UNet needs (64 for SD)."""
    return max([s.scale_factor * m for s in specs for m in s.multiples.values()] + [s.scale_factor for s in specs])

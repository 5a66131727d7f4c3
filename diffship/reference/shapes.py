"""Request shapes: the image sizes, batches and sequence lengths a component is traced, built or
checked for, and the dtype names of specs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffship.errors import ShapeError

#: dtype names used in specs; ``float`` follows the export precision, ``float32`` never does.
FLOAT = "float"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32}
#: torch dtype of the traced module per export precision; weight-only formats (int8) trace in fp32.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
                    f"{name} {size} is not a positive multiple of {scale_factor} (the image sizes this model takes); "
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


#: the longest T5 sequence diffusers' SD3 and Flux pipelines take (their ``max_sequence_length`` check).
MAX_TEXT_SEQUENCE = 512

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
        text_sequence: (min, opt, max) T5 sequence length (the pipelines' ``max_sequence_length``) for
            pipelines with a T5 encoder; None: the pipeline's default only.
    """

    batch: Range
    height: Range
    width: Range
    sequence_length: int = 77
    guidance: bool = True
    text_sequence: Range | None = None

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
        ranges = (("batch", self.batch), ("height", self.height), ("width", self.width),
                  *((("text_sequence", self.text_sequence),) if self.text_sequence is not None else ()))
        for name, r in ranges:
            if len(r) != 3 or not r[0] <= r[1] <= r[2]:
                raise ShapeError(f"profile {name} {list(r)} is not [min, opt, max] with min <= opt <= max")
            if r[0] < 1:
                raise ShapeError(f"profile {name} {list(r)} must be at least 1")
            if name == "text_sequence" and r[2] > MAX_TEXT_SEQUENCE:
                raise ShapeError(f"profile text_sequence {list(r)}: diffusers' SD3 and Flux pipelines take at most "
                                 f"{MAX_TEXT_SEQUENCE} T5 tokens (max_sequence_length)")
            if name != "batch" and any(v % size_multiple for v in r):
                bad = next(v for v in r if v % size_multiple)
                raise ShapeError(f"profile {name} {list(r)}: {bad} is not a multiple of {size_multiple}, the image "
                                 f"sizes this model's UNet takes (e.g. {max(size_multiple, bad // size_multiple * size_multiple)})")

    def describe(self) -> str:
        """e.g. ``"1-4 images of 256-1024 x 256-1024 px"``."""
        text = f" with {span(self.text_sequence)} T5 tokens" if self.text_sequence is not None else ""
        return f"{span(self.batch)} image(s) of {span(self.height)} x {span(self.width)} px{text}"

"""Core ML: one ML Program (``<component>/model.mlpackage``) per component, converted with coremltools,
run by Core ML on macOS and by diffship's MIL reference evaluator elsewhere.

What the exporter and the runtime share lives here: the model IO Apple's Swift pipeline
(ml-stable-diffusion) expects where it differs from the spec's -- ``input_ids`` as float32, the UNet's
``encoder_hidden_states`` as (B, D, 1, S) -- and reading a saved ML Program back.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffship.backends.base import Backend, Details
from diffship.configs.fields import comma_list, option
from diffship.errors import ExportedModelError, OptionError
from diffship.reference.attention import VARIANTS as ATTENTION

MODEL_FILE = "model.mlpackage"
PRECISIONS = ("fp32", "fp16", "palette4", "palette6", "palette8", "palette-mixed", "int8")
#: weight formats compress an fp16 model.
COMPUTE = {"palette4": "fp16", "palette6": "fp16", "palette8": "fp16", "palette-mixed": "fp16", "int8": "fp16"}
#: the denoiser's mixed-bit palettes are chosen on inputs recorded from eager runs.
CALIBRATED = ("palette-mixed",)
TARGETS = ("macOS13", "macOS14", "macOS15", "iOS16", "iOS17", "iOS18")
#: targets whose Core ML reads per-grouped-channel palettes and 3-bit palettes (iOS 18 / macOS 15).
GROUPED_TARGETS = ("macOS15", "iOS18")
#: palette widths Core ML reads (3 bits from iOS 18 / macOS 15).
PALETTE_BITS = (1, 2, 3, 4, 6, 8)
GRANULARITIES = ("per_tensor", "per_grouped_channel")
#: ``compute_units`` names (as Apple's Swift CLI spells them) -> coremltools ComputeUnit members.
COMPUTE_UNITS = {"all": "ALL", "cpuOnly": "CPU_ONLY", "cpuAndGPU": "CPU_AND_GPU", "cpuAndNeuralEngine": "CPU_AND_NE"}
EVALUATORS = ("auto", "coreml", "mil")

#: model inputs that differ from the spec's for Apple's Swift pipeline: component -> input -> (dtype, layout).
#: ``bc1s``: a (B, S, D) tensor passed as (B, D, 1, S).
APPLE_INPUTS = {"text_encoder": {"input_ids": ("float32", None)}, "text_encoder_2": {"input_ids": ("float32", None)},
                "text_encoder_3": {"input_ids": ("float32", None)}, "unet": {"encoder_hidden_states": ("float32", "bc1s")}}


def _int_list(value: Any) -> Any:
    """``"2,4"`` or ``4`` -> ``[2, 4]`` / ``[4]`` (command-line lists of widths); other values as they are."""
    if isinstance(value, int):
        return [value]
    items = comma_list(value)
    if isinstance(items, list):
        return [int(v) if isinstance(v, str) and v.isdigit() else v for v in items]
    return items


@dataclass(frozen=True)
class CoreMLExportOptions:
    """``-o`` options of a Core ML export.

    Attributes:
        attention: ``original`` or ``split_einsum`` (the Neural Engine's layout).
        deployment_target: the oldest OS the models load on (``macOS13`` ... ``iOS18``).
        sizes: more image sizes the same model takes (enumerated shapes); the export's own comes first.
        palette_granularity: ``per_tensor`` (one palette per weight) or ``per_grouped_channel`` (one per
            ``palette_group_size`` output channels; iOS 18 / macOS 15), for the ``palette*`` precisions.
        palette_bits: the widths ``palette-mixed`` chooses among (default 2, 4, 6, 8; a weight may also
            stay fp16).
        target_psnr: the output PSNR (dB) ``palette-mixed`` keeps, measured in PyTorch per component.
        author / license / version: model metadata (defaults: diffship, the source's license, its fingerprint).
    """

    attention: str = option("original", choices=ATTENTION)
    deployment_target: str = option("macOS13", choices=TARGETS)
    sizes: tuple[tuple[int, int], ...] = option((), normalize=comma_list)
    palette_granularity: str = option("per_tensor", choices=GRANULARITIES)
    palette_group_size: int = option(16, minimum=1)
    palette_bits: tuple[int, ...] = option((2, 4, 6, 8), normalize=_int_list)
    target_psnr: float = option(40.0, minimum=10.0, maximum=150.0)
    author: str | None = None
    license: str | None = None
    version: str | None = None

    def __post_init__(self):
        unknown = [b for b in self.palette_bits if b not in PALETTE_BITS]
        if unknown or not self.palette_bits:
            raise OptionError(f"coreml export option palette_bits takes widths among "
                              f"{', '.join(map(str, PALETTE_BITS))}, got {list(self.palette_bits)}")
        newer = ("per-grouped-channel palettes" if self.palette_granularity == "per_grouped_channel"
                 else "3-bit palettes" if 3 in self.palette_bits else None)
        if newer and self.deployment_target not in GROUPED_TARGETS:
            raise OptionError(f"{newer} need Core ML of iOS 18 / macOS 15; add -o deployment_target=iOS18 "
                              f"(or macOS15), got {self.deployment_target}")

    @property
    def group_size(self) -> int | None:
        """Output channels per palette, or None for one palette per weight."""
        return self.palette_group_size if self.palette_granularity == "per_grouped_channel" else None


@dataclass(frozen=True)
class CoreMLRuntimeOptions:
    """Core ML runtime options.

    Attributes:
        compute_units: ``all`` (default), ``cpuOnly``, ``cpuAndGPU`` or ``cpuAndNeuralEngine`` (Core ML runtime).
        evaluator: ``auto`` (Core ML on macOS, the MIL reference elsewhere), ``coreml`` or ``mil``.
    """

    compute_units: str = option("all", choices=tuple(COMPUTE_UNITS))
    evaluator: str = option("auto", choices=EVALUATORS)


@dataclass(frozen=True)
class ModelInput:
    """One input of the Core ML model as Apple's pipeline feeds it.

    Attributes:
        name: the input's name (the spec's).
        dtype: its dtype in the model (``float32``).
        layout: ``bc1s`` where the model takes (B, D, 1, S) for the spec's (B, S, D); None otherwise.
        shapes: every shape the model takes (one per enumerated size).
    """

    name: str
    dtype: str
    layout: str | None
    shapes: list[list[int]]


@dataclass(frozen=True)
class MixedBits:
    """How a ``palette-mixed`` component's palette widths were chosen (see :mod:`diffship.exporters.palettes`).

    Attributes:
        target_psnr: the output PSNR (dB) the choice keeps.
        psnr: the output PSNR measured in PyTorch with every chosen palette applied (worst output); None
            where no weight changed.
        average_bits: bits per element over the palettized-or-not weights above the size threshold.
        samples: the inputs it was measured on (recorded pipeline calls, or seeded examples).
        bits: the program's weight constant -> palette width (16: left fp16).
    """

    target_psnr: float
    psnr: float | None
    average_bits: float
    samples: int
    bits: dict[str, int]


@dataclass(kw_only=True)
class CoreMLDetails(Details):
    """What a Core ML export records per component.

    Attributes:
        attention / deployment_target: as exported (see :class:`CoreMLExportOptions`).
        compute_precision: ``fp32`` or ``fp16``.
        weights: the weight format (``palette4``... ``int8``), or None (plain weights).
        palette_group_size: output channels per palette (per-grouped-channel palettes), or None.
        mixed_bits: the chosen widths of a ``palette-mixed`` export (:class:`MixedBits`), or None.
        sizes: the image sizes (height, width) the model takes.
        model_inputs: the model's own inputs (:class:`ModelInput`).
        mil_ops: the operation types of the saved program.
        package: the ML Program's path relative to the export folder where it is not
            ``<component>/model.mlpackage`` (another tool's layout: Apple's ``torch2coreml``), else None.
        model_names: spec IO name -> the model's own name, where they differ (Apple's ``noise_pred`` for
            ``out_sample``...); empty for diffship's exports.
    """

    attention: str
    deployment_target: str
    compute_precision: str
    weights: str | None = None
    palette_group_size: int | None = None
    mixed_bits: MixedBits | None = None
    sizes: list[list[int]]
    model_inputs: list[ModelInput]
    mil_ops: list[str]
    package: str | None = None
    model_names: dict[str, str] = field(default_factory=dict)


def has_coreml_runtime() -> bool:
    """Whether Core ML itself can run models here (macOS only)."""
    return platform.system() == "Darwin"


def adaptation(component: str, name: str) -> tuple[str, str | None]:
    """(model dtype, layout) of an input: float32 as the spec has it, unless ``APPLE_INPUTS`` says otherwise."""
    return APPLE_INPUTS.get(component, {}).get(name, ("float32", None))


def model_shape(component: str, name: str, shape: tuple) -> tuple:
    """The Core ML model's shape for a spec input of ``shape`` (``bc1s`` inputs are (B, D, 1, S))."""
    if adaptation(component, name)[1] == "bc1s":
        return shape[0], shape[2], 1, shape[1]
    return tuple(shape)


def to_model_inputs(adaptations: dict[str, tuple[str, str | None]], feeds: dict[str, Any]) -> dict[str, Any]:
    """Spec-form inputs -> the Core ML model's: each input named in ``adaptations`` (name -> (model dtype,
    layout), as :func:`adaptation` or a :class:`ModelInput` gives them) cast and laid out as the model takes it."""
    out = {}
    for name, value in feeds.items():
        if name in adaptations:
            dtype, layout = adaptations[name]
            value = np.asarray(value)
            if layout == "bc1s":
                value = np.ascontiguousarray(value.transpose(0, 2, 1)[:, :, None, :])
            value = value.astype(dtype)
        out[name] = value
    return out


def load_mil_program(package: Path):
    """A saved ``.mlpackage``'s MIL program (weights included) and its specification version."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    package = Path(package)
    try:
        spec = ct.utils.load_spec(str(package))
        weights = package / "Data" / "com.apple.CoreML" / "weights"
        return load_milproto(spec, spec.specificationVersion, str(weights)), spec.specificationVersion
    except Exception as exc:
        raise ExportedModelError(f"could not read the ML Program in {package} ({type(exc).__name__}: {exc}); "
                                 f"re-run diffship export") from exc


def load_program(package: Path):
    """The ``main`` function of a saved ``.mlpackage``'s MIL program, weights included."""
    return load_mil_program(package)[0].functions["main"]


def program_ops(path: str) -> list[str]:
    """The operation types of a saved ML Program (reading it back proves it is complete)."""
    return sorted({op.op_type for op in load_program(Path(path)).operations})


COREML = Backend(
    name="coreml", extra="coreml", packages=("coremltools",), runtime_packages=("coremltools",),
    precisions=PRECISIONS, compute=COMPUTE, calibrated=CALIBRATED, fixed_shapes=True, model_file=MODEL_FILE,
    export_options=CoreMLExportOptions, runtime_options=CoreMLRuntimeOptions, details=CoreMLDetails,
    exporter="diffship.exporters.coreml", runner="diffship.runtimes.coreml:CoreMLRunner",
)

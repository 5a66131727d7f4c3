"""Core ML folders written by Apple's ml-stable-diffusion, read as diffship manifests.

``python -m python_coreml_stable_diffusion.torch2coreml -o OUT`` writes one ML Program per component,
``OUT/Stable_Diffusion_version_<model>_<component>.mlpackage`` (``text_encoder``, ``unet``,
``vae_decoder``, ``vae_encoder``, ``safety_checker``...), and nothing else: no ``model_index.json``,
configs, scheduler or tokenizer. Apple's Swift resource folders hold the same models under fixed
names (``TextEncoder``, ``Unet``, ``VAEDecoder``, ``VAEEncoder``), compiled to ``.mlmodelc`` by
``--bundle-resources-for-swift-cli`` (or as ``.mlpackage`` where nothing compiled them, as
``diffship package --target swift`` leaves them without Xcode).

:func:`apple_manifest` describes such a folder as a :class:`~diffship.backends.manifest.Manifest` with
origin ``apple-torch2coreml``: each component's IO read from its package's model description and mapped to
the spec's names (Apple's text encoder outputs ``pooled_outputs``, its UNet ``noise_pred``, its VAE
decoder takes ``z`` and returns ``image``, its encoder takes ``x`` and returns ``latent``: the
moments diffship calls ``latent_parameters``), the model's own dtypes (Apple feeds the UNet and the SD
VAE float16, token ids float32) and layouts (the UNet's ``encoder_hidden_states`` as (B, D, 1, S)),
the precision from the program (fp16 or fp32 compute, palettes, 8-bit weights). Sizes are fixed: the
manifest is static at the size the packages take. The configs, scheduler and tokenizer come from the
source it was converted from (``diffship parity SOURCE FOLDER``, ``load_pipeline(FOLDER,
source=...)``), or are written beside the packages by ``diffship adopt FOLDER --source SOURCE``.

Refused by name: SDXL text encoders (Apple's give only ``hidden_embeds`` and ``pooled_outputs``;
diffusers' SDXL pipeline also reads the last hidden state), chunked UNets, ControlNet UNets, SD3's
MMDiT, compiled ``.mlmodelc`` (Core ML on macOS alone reads them), models of two conversions in one
folder, and any input or output outside the map. The safety checker is not run by diffship's
pipelines, and is left out of the manifest.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffship.backends.coreml import CoreMLDetails, ModelInput
from diffship.backends.manifest import ComponentEntry, Manifest, Shapes, TensorIO
from diffship.errors import ExportedModelError
from diffship.reference.loader import SourceInfo
from diffship.reference.shapes import ShapeProfile

ORIGIN = "apple-torch2coreml"
#: torch2coreml's file names: Stable_Diffusion_version_<model version, "/" as "_">_<component>.mlpackage.
PATTERN = re.compile(r"^Stable_Diffusion_version_(?P<version>.+?)_(?P<component>text_encoder|text_encoder_2|unet|"
                     r"unet_chunk[12]|control-unet|refiner|refiner_chunk[12]|vae_decoder|vae_encoder|safety_checker|"
                     r"mmdit)\.(?P<kind>mlpackage|mlmodelc)$")
#: the Swift pipeline's resource names -> torch2coreml's component names.
SWIFT = {"TextEncoder": "text_encoder", "TextEncoder2": "text_encoder_2", "Unet": "unet",
         "UnetChunk1": "unet_chunk1", "UnetChunk2": "unet_chunk2", "VAEDecoder": "vae_decoder",
         "VAEEncoder": "vae_encoder", "SafetyChecker": "safety_checker", "MultiModalDiffusionTransformer": "mmdit",
         "TextEncoderT5": "text_encoder_t5", "ControlledUnet": "control-unet"}
#: components diffship runs -> the pipeline module each replaces.
SOURCES = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
IGNORED = ("safety_checker",)
#: what cannot be mapped, and why.
REFUSED = {
    "text_encoder_2": "SDXL: Apple's text encoders give only hidden_embeds and pooled_outputs, and diffusers' SDXL "
                      "pipeline also reads the last hidden state",
    "unet_chunk1": "a chunked UNet: convert without --chunk-unet", "unet_chunk2": "a chunked UNet: convert without "
    "--chunk-unet", "refiner": "an SDXL refiner", "refiner_chunk1": "an SDXL refiner", "refiner_chunk2": "an SDXL "
    "refiner", "control-unet": "a ControlNet UNet (additional_residual_* inputs)", "mmdit": "SD3's MMDiT",
    "text_encoder_t5": "SD3's T5 encoder",
}
#: per component, the model's IO name -> the spec's (names not listed are the spec's own).
NAMES = {"text_encoder": {"input_ids": "input_ids", "last_hidden_state": "last_hidden_state",
                          "pooled_outputs": "pooler_output", "pooler_output": "pooler_output"},
         "unet": {"sample": "sample", "timestep": "timestep", "encoder_hidden_states": "encoder_hidden_states",
                  "noise_pred": "out_sample", "out_sample": "out_sample"},
         "vae_decoder": {"z": "latent_sample", "latent_sample": "latent_sample", "image": "sample", "sample": "sample"},
         "vae_encoder": {"x": "sample", "sample": "sample", "latent": "latent_parameters",
                         "latent_parameters": "latent_parameters"}}
#: Core ML specification version -> the oldest deployment target that reads it.
TARGETS = {7: "macOS13", 8: "macOS14", 9: "macOS15"}


def find_packages(folder: Path) -> dict[str, str] | None:
    """torch2coreml component -> package path (relative to ``folder``) of an Apple layout, else None.

    Raises:
        ExportedModelError: compiled models only, models of two conversions, or a component diffship
            cannot map.
    """
    found: dict[str, list[str]] = {}
    versions, compiled = set(), []
    for entry in sorted(folder.iterdir()):
        match = PATTERN.match(entry.name)
        stem, _, suffix = entry.name.rpartition(".")
        component = match["component"] if match else SWIFT.get(stem) if suffix in ("mlpackage", "mlmodelc") else None
        if component is None or not entry.is_dir():
            continue
        if match:
            versions.add(match["version"])
        if suffix == "mlmodelc":
            compiled.append(entry.name)
        else:
            found.setdefault(component, []).append(entry.name)
    if not found and not compiled:
        return None
    if not found:
        raise ExportedModelError(f"{folder} holds compiled Core ML models ({', '.join(compiled)}), which only Core ML "
                                 f"on macOS loads; point diffship at the .mlpackage files torch2coreml writes (before "
                                 f"--bundle-resources-for-swift-cli compiles them)")
    if len(versions) > 1 or any(len(names) > 1 for names in found.values()):
        raise ExportedModelError(f"{folder} holds models of more than one conversion ({', '.join(sorted(versions))}); "
                                 f"diffship reads one pipeline per folder")
    refused = sorted(c for c in found if c in REFUSED)
    if refused:
        raise ExportedModelError(f"{folder}: {found[refused[0]][0]} is {REFUSED[refused[0]]}; diffship maps Apple's "
                                 f"{', '.join(SOURCES)}")
    return {c: names[0] for c, names in found.items() if c not in IGNORED}


def apple_manifest(folder: Path) -> Manifest | None:
    """A manifest describing the Apple Core ML folder ``folder``, or None where it holds no Apple layout.

    Raises:
        ExportedModelError: a layout diffship cannot map (see the module docstring).
    """
    from diffship.backends import get
    from diffship.reference.families import family_of

    packages = find_packages(folder)
    if packages is None:
        return None
    missing = [c for c in ("text_encoder", "unet", "vae_decoder") if c not in packages]
    if missing:
        raise ExportedModelError(f"{folder} lacks Apple's {', '.join(missing)} model; a pipeline needs text_encoder, "
                                 f"unet and vae_decoder")
    get("coreml").require(runtime=True)
    components, precisions, meta = {}, set(), {}
    for name, package in packages.items():
        entry, precision, metadata = _component(folder, name, package)
        components[name] = entry
        precisions.add(precision)
        meta.update({k: v for k, v in metadata.items() if v})
    family = family_of("StableDiffusionPipeline")
    image = components["vae_decoder"].outputs[0].dims
    components = {n: replace(e, details=replace(e.details, sizes=[[image[2], image[3]]])) for n, e in components.items()}
    unet = components["unet"]
    channels = {"in_channels": unet.inputs[0].dims[1], "out_channels": unet.outputs[0].dims[1]}
    text, latents = components["text_encoder"].inputs[0].dims, unet.inputs[0].dims
    profile = ShapeProfile(batch_size=text[0], height=image[2], width=image[3], sequence_length=text[1],
                           guidance=latents[0] == 2 * text[0])
    version = meta.get("version") or folder.name
    source = SourceInfo(name=version, kind="foreign", path=str(folder), pipeline_class="StableDiffusionPipeline",
                        fingerprint="")
    versions = {k: v for k, v in (("coremltools", meta.get("coremltools")),
                                  ("ml-stable-diffusion", meta.get("ml-stable-diffusion"))) if v}
    return Manifest(backend="coreml", precision=_overall(precisions), family=family.name,
                    pipeline_class="StableDiffusionPipeline",
                    tasks=family.tasks_for(components, {"unet": channels}), source=source,
                    shapes=Shapes(static=True, profile=profile), components=components, versions=versions,
                    origin=ORIGIN)


def write_pipeline_configs(pipe: Any, folder: Path, manifest: Manifest) -> None:
    """Write what an Apple folder lacks into ``folder``, from ``pipe``, the pipeline it was converted from:
    ``model_index.json``, scheduler, tokenizer and each component's ``<component>/config.json``, as a
    diffship export holds them.

    Raises:
        ExportedModelError: ``pipe`` is not what the packages were converted from (another family, or
            configs whose channels and widths differ from the packages').
    """
    from diffship.reference.families import family_of
    from diffship.reference.pipelines import pipeline_configs, save_module_config, write_pipeline_files

    what = f"{manifest.source.path} ({manifest.origin})"
    family = family_of(type(pipe).__name__)
    if family.name != manifest.family:
        raise ExportedModelError(f"{what} holds a {manifest.family} pipeline, but the source given is "
                                 f"{type(pipe).__name__}; give the source it was converted from")
    for spec in family.specs(pipeline_configs(pipe)):
        entry = manifest.components.get(spec.name)
        if entry is None:
            continue
        ios = {t.name: t for t in (*entry.inputs, *entry.outputs)}
        for tensor in (*spec.inputs, *spec.outputs):
            io = ios.get(tensor.name)
            fixed = [(axis, d) for axis, d in enumerate(tensor.dims) if isinstance(d, int)]
            if io is None or len(io.dims) != len(tensor.dims) or any(io.dims[a] != d for a, d in fixed):
                got = "absent" if io is None else f"{io.dims}"
                raise ExportedModelError(f"{what}: {spec.name}'s {tensor.name} is {got}, but the source's config makes "
                                         f"it {list(tensor.dims)}; give the source it was converted from")
    write_pipeline_files(pipe, folder, manifest.backend, {n: e.source for n, e in manifest.components.items()})
    for name, entry in manifest.components.items():
        save_module_config(getattr(pipe, entry.source), folder / name)


def _component(folder: Path, name: str, package: str) -> tuple[ComponentEntry, str, dict[str, str]]:
    """The manifest entry of one package, its precision and its metadata (model version, tool versions)."""
    import coremltools as ct

    path = folder / package
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as exc:
        raise ExportedModelError(f"{path} is not a readable Core ML package ({type(exc).__name__}: {exc})") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExportedModelError(f"{path} is a Core ML {spec.WhichOneof('Type')} model; diffship runs ML Programs "
                                 f"(torch2coreml's default, --convert-to mlprogram)")
    names = NAMES[name]

    def mapped(feature) -> str:
        if feature.name not in names:
            known = ", ".join(sorted(set(names)))
            raise ExportedModelError(f"{path}: {name} has {feature.name!r}, which diffship cannot map to its spec "
                                     f"(it maps {known})")
        return names[feature.name]

    model_inputs, inputs, renames = [], [], {}
    for feature in spec.description.input:
        shape, dtype = _array(path, feature)
        spec_name = mapped(feature)
        layout = "bc1s" if name == "unet" and spec_name == "encoder_hidden_states" and len(shape) == 4 else None
        dims = [shape[0], shape[3], shape[1]] if layout else list(shape)
        model_inputs.append(ModelInput(name=spec_name, dtype=dtype, layout=layout, shapes=[list(shape)]))
        inputs.append(TensorIO(name=spec_name, dtype="int64" if spec_name == "input_ids" else "float32", dims=dims))
        if feature.name != spec_name:
            renames[spec_name] = feature.name
    outputs = []
    for feature in spec.description.output:
        spec_name = mapped(feature)
        outputs.append(TensorIO(name=spec_name, dtype="float32", dims=list(_array(path, feature)[0])))
        if feature.name != spec_name:
            renames[spec_name] = feature.name
    ops, fp16, weights = _program_facts(spec)
    details = CoreMLDetails(attention="split_einsum" if "einsum" in ops else "original",
                            deployment_target=TARGETS.get(spec.specificationVersion, f"spec{spec.specificationVersion}"),
                            compute_precision="fp16" if fp16 else "fp32", weights=weights, sizes=[],
                            model_inputs=model_inputs, mil_ops=sorted(ops), package=package, model_names=renames)
    precision = weights or ("fp16" if fp16 else "fp32")
    user = spec.description.metadata.userDefined
    metadata = {"version": spec.description.metadata.versionString,
                "coremltools": user.get("com.github.apple.coremltools.version", ""),
                "ml-stable-diffusion": user.get("com.github.apple.ml-stable-diffusion.version", "")}
    entry = ComponentEntry(component=name, source=SOURCES[name], precision=precision, files=[],
                           inputs=tuple(inputs), outputs=tuple(outputs), details=details)
    return entry, precision, metadata


def _array(path: Path, feature) -> tuple[tuple[int, ...], str]:
    """A multi-array feature's shape (its first enumerated shape, which is the default) and numpy dtype."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    if feature.type.WhichOneof("Type") != "multiArrayType":
        raise ExportedModelError(f"{path}: {feature.name} is a {feature.type.WhichOneof('Type')}, not a tensor; "
                                 f"diffship feeds and reads tensors")
    array = feature.type.multiArrayType
    dtypes = {ft.ArrayFeatureType.FLOAT32: "float32", ft.ArrayFeatureType.FLOAT16: "float16",
              ft.ArrayFeatureType.INT32: "int32", ft.ArrayFeatureType.DOUBLE: "float64"}
    shape = tuple(array.shape) or (tuple(array.enumeratedShapes.shapes[0].shape)
                                   if array.enumeratedShapes.shapes else ())
    return tuple(int(d) for d in shape), dtypes.get(array.dataType, "float32")


def _program_facts(spec) -> tuple[set[str], bool, str | None]:
    """From the program (without its weights): operation types, whether it computes in fp16, and the
    weight format (``palette<N>``, ``palette-mixed`` for several widths, ``int8``) or None."""
    from coremltools.proto import MIL_pb2

    fp16 = MIL_pb2.DataType.Value("FLOAT16")
    ops: set[str] = set()
    half = False
    widths: set[int] = set()
    consts: dict[str, Any] = {}
    luts: list[Any] = []

    def walk(block) -> None:
        nonlocal half
        for op in block.operations:
            ops.add(op.type)
            half = half or any(o.type.tensorType.dataType == fp16 for o in op.outputs)
            if op.type == "const" and "val" in op.attributes:
                consts.update({o.name: op.attributes["val"] for o in op.outputs})
            if op.type == "constexpr_lut_to_dense":
                luts.append(op)
            for inner in op.blocks:
                walk(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    for op in luts:
        if "lut" in op.attributes:  # iOS 16: a (2^n,) palette attribute
            widths.add(_bits(op.attributes["lut"].type.tensorType.dimensions[0]))
        elif "lut" in op.inputs and (value := consts.get(op.inputs["lut"].arguments[0].name)) is not None:
            widths.add(_bits(value.type.tensorType.dimensions[-2]))  # iOS 18: (..., 2^n, vector size)
    if widths:
        weights = f"palette{widths.pop()}" if len(widths) == 1 else "palette-mixed"
    elif ops & {"constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"}:
        weights = "int8"
    else:
        weights = None
    return ops, half, weights


def _bits(dimension) -> int:
    return int(math.log2(dimension.constant.size))


def _overall(precisions: set[str]) -> str:
    """The folder's precision: its components' most compressed."""
    for p in ("palette-mixed", *sorted(p for p in precisions if p.startswith("palette")), "int8", "fp16"):
        if p in precisions:
            return p
    return "fp32"


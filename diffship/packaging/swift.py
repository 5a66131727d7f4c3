"""Resources for Apple's ml-stable-diffusion Swift package (``StableDiffusionPipeline(resourcesAt:)`` and
``StableDiffusionXLPipeline(resourcesAt:)``).

The Swift pipelines load compiled models by fixed names from one folder -- ``TextEncoder.mlmodelc`` (and
``TextEncoder2.mlmodelc`` for SDXL), ``Unet.mlmodelc`` (or ``UnetChunk1.mlmodelc`` + ``UnetChunk2.mlmodelc``,
which they prefer), ``VAEDecoder.mlmodelc``, optionally ``VAEEncoder.mlmodelc`` (image-to-image) -- plus the
CLIP BPE ``vocab.json`` and ``merges.txt``. They find inputs and outputs as diffship's Core ML exports have
them (text encoder: one float32 ``input_ids`` input; UNet: ``sample``, ``timestep``,
``encoder_hidden_states`` as (2, D, 1, 77), for SDXL also ``text_embeds`` and ``time_ids`` (6 ids; 5 for the
refiner, which the SDXL pipeline recognises by that), one output; decoder and encoder: one input, one
output), except the SDXL text encoders' outputs, which that pipeline reads as ``hidden_embeds`` (the
penultimate hidden state) and ``pooled_outputs``: they are renamed in the package. The pipelines take
the latent shape from the UNet's ``sample`` input and run classifier-free guidance as a batch of 2.

Compiling a package into ``.mlmodelc`` needs ``xcrun coremlcompiler`` (macOS with Xcode). Where it is
missing the folder holds the ``.mlpackage`` files under the same names and ``compile-models.sh``, one
line that compiles them on a Mac.

``chunk_unet`` splits the UNet into two ML Programs of about equal weight size
(``coremltools.models.utils.bisect_model``); by default the split is verified by running the whole
UNet and the chained chunks through the MIL reference evaluator on the same inputs.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from diffship._files import atomic_folder, atomic_write, read_json, write_json
from diffship.backends.coreml import MODEL_FILE
from diffship.backends.manifest import ComponentEntry, Manifest, read_manifest
from diffship.errors import DiffshipError, ExportError, SourceError
from diffship.progress import Progress, silent
from diffship.reference.vocabulary import bpe_files

#: exported component -> the Swift pipeline's resource name.
_SD = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder",
                  "vae_encoder": "VAEEncoder"}
#: per family: exported component -> resource name; the components the pipeline cannot do without; and
#: the outputs it reads under other names (the SDXL text encoders' ``hidden_embeds`` and ``pooled_outputs``).
LAYOUTS: dict[str, dict[str, Any]] = {
    "stable-diffusion": {"resources": _SD, "required": ("text_encoder", "unet", "vae_decoder"), "outputs": {}},
    "stable-diffusion-xl": {
        "resources": {**_SD, "text_encoder_2": "TextEncoder2"},
        "required": ("text_encoder_2", "unet", "vae_decoder"),  # the refiner has no first text encoder
        "outputs": {"text_encoder": {"penultimate_hidden_state": "hidden_embeds", "pooler_output": "pooled_outputs"},
                    "text_encoder_2": {"penultimate_hidden_state": "hidden_embeds", "text_embeds": "pooled_outputs"}},
    },
}

COMPILE_SCRIPT = "compile-models.sh"
PACKAGE_MANIFEST = "diffship-package.json"
#: largest |whole - chained| accepted when verifying a chunked UNet (fp16 programs round at ~1e-3).
CHUNK_TOLERANCE = 1e-3


def can_compile() -> bool:
    """Whether ``xcrun coremlcompiler`` is available (macOS with Xcode's command-line tools)."""
    return platform.system() == "Darwin" and shutil.which("xcrun") is not None


def package_swift(exported: str | Path, out: str | Path, *, chunk_unet: bool = False, compile_models: bool | None = None,
                  verify: bool = True, overwrite: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Write the Swift pipeline's resource folder for a Core ML export.

    Args:
        exported: a folder written by ``diffship export ... --backend coreml``.
        out: the resource folder to create (atomically).
        chunk_unet: split the UNet into ``UnetChunk1`` and ``UnetChunk2``.
        compile_models: compile to ``.mlmodelc`` (default: where ``xcrun`` exists).
        verify: check that the chained chunks compute what the whole UNet does.
        overwrite: replace ``out`` if it is an earlier package.
        progress: called with a line of text before each step.

    Returns:
        The package description written to ``out/diffship-package.json``.
    """
    say = progress or silent
    exported, out = Path(exported), Path(out)
    manifest = read_manifest(exported)
    _check_export(exported, manifest)
    compile_models = can_compile() if compile_models is None else compile_models
    if compile_models and not can_compile():
        raise DiffshipError("compiling Core ML models needs xcrun coremlcompiler (macOS with Xcode); leave compiling "
                            f"to {COMPILE_SCRIPT} on a Mac (omit --compile)")
    layout = LAYOUTS[manifest.family]
    facts: dict[str, Any] = {"format": "diffship.swift-resources/1", "source": manifest.source.name,
                             "precision": manifest.precision, "chunked": chunk_unet, "compiled": compile_models}
    with atomic_folder(out, overwrite=overwrite, replaceable=_is_package, what="diffship package") as tmp, \
            tempfile.TemporaryDirectory(prefix="diffship-swift-") as scratch:
        packages = {}
        for component, name in layout["resources"].items():
            if component not in manifest.components:
                continue
            say(f"copying {component} as {name}")
            packages[name] = Path(scratch) / f"{name}.mlpackage"
            shutil.copytree(exported / component / MODEL_FILE, packages[name])
            if renames := layout["outputs"].get(component):
                rename_outputs(packages[name], renames)
        if chunk_unet:
            say("splitting the UNet into two chunks")
            packages.update(split_unet(packages.pop("Unet"), Path(scratch)))
            if verify:
                say("checking that the chained chunks equal the whole UNet (MIL reference evaluator)")
                facts["chunk_max_abs_error"] = verify_chunks(exported / "unet" / MODEL_FILE,
                                                             packages["UnetChunk1"], packages["UnetChunk2"],
                                                             manifest.components["unet"])
        for name, package in packages.items():
            if compile_models:
                say(f"compiling {name}")
                _compile(package, tmp)
            else:
                shutil.copytree(package, tmp / package.name)
        tokenizer = next(exported / t for t in ("tokenizer", "tokenizer_2") if (exported / t).is_dir())
        _write_vocabulary(tokenizer, tmp)
        if not compile_models:
            atomic_write(tmp / COMPILE_SCRIPT, _compile_script())
            (tmp / COMPILE_SCRIPT).chmod(0o755)
        facts["resources"] = sorted(p.name for p in tmp.iterdir())
        facts["notes"] = _scheduler_notes(exported)
        write_json(tmp / PACKAGE_MANIFEST, facts)
    return facts


def _is_package(folder: Path) -> bool:
    """Whether ``folder`` is a package this module wrote (its description parses), so --overwrite may replace it."""
    try:
        return read_json(folder / PACKAGE_MANIFEST).get("format") == "diffship.swift-resources/1"
    except (OSError, ValueError, AttributeError):
        return False


def _check_export(exported: Path, manifest: Manifest) -> None:
    if manifest.backend != "coreml":
        raise DiffshipError(f"{exported} was exported for {manifest.backend}; --target swift packages Core ML "
                            f"exports (diffship export SOURCE OUT --backend coreml)")
    if manifest.family not in LAYOUTS:
        raise DiffshipError(f"--target swift packages {', '.join(LAYOUTS)} pipelines, not {manifest.family}")
    layout = LAYOUTS[manifest.family]
    missing = [c for c in layout["required"] if c not in manifest.components]
    if missing:
        raise DiffshipError(f"{exported} lacks {', '.join(missing)}, which the Swift pipeline needs; export every "
                            f"component (no --component)")
    for component, renames in layout["outputs"].items():
        entry = manifest.components.get(component)
        if entry and (absent := [o for o in renames if o not in entry.output_names]):
            raise DiffshipError(f"{exported}: {component} has no {', '.join(absent)} output, which the Swift pipeline "
                                f"reads; re-export it with this diffship")
    unet = manifest.components["unet"].inputs[0].dims
    text = next(manifest.components[c] for c in ("text_encoder", "text_encoder_2")
                if c in manifest.components).inputs[0].dims
    if unet[0] != 2 or text[0] != 1:
        raise DiffshipError("the Swift pipeline runs one prompt with classifier-free guidance (text encoder batch 1, "
                            "UNet batch 2); re-export with --batch 1 and guidance (no --no-guidance)")


def rename_outputs(package: Path, renames: dict[str, str]) -> None:
    """Rename outputs of a saved ML Program in place (its feature description and program outputs)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    for old, new in renames.items():
        ct.utils.rename_feature(spec, old, new, rename_inputs=False)
    renamed = package.with_name(f"{package.stem}.renamed.mlpackage")
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    ct.models.MLModel(spec, weights_dir=str(weights), skip_model_load=True).save(str(renamed))
    shutil.rmtree(package)
    renamed.rename(package)


def weights_beside_their_use(package: Path, out: Path) -> Path:
    """``package`` saved again with each constant (weights) just before the first operation that reads it.

    ``torch.export`` conversions put nearly every constant before the first compute operation; coremltools'
    ``bisect_model`` cuts where the weights seen so far pass half of them, which would then be after a few
    operations (chunk 1 all constants, chunk 2 all compute). Beside their use, weights are spread through
    the program as the compute is, and the cut falls in the middle. The program is otherwise unchanged
    (no passes run when it is saved again).
    """
    import coremltools as ct

    from diffship.backends.coreml import load_mil_program

    program, version = load_mil_program(package)
    main = program.functions["main"]
    operations = list(main.operations)
    placed: set[int] = set()
    order: list = []

    def constant(op) -> bool:
        return op.op_type == "const" or op.op_type.startswith("constexpr")

    def place(op) -> None:
        if id(op) in placed:
            return
        for value in op.inputs.values():
            for var in value if isinstance(value, (list, tuple)) else (value,):
                if var.op is not None and constant(var.op):
                    place(var.op)
        placed.add(id(op))
        order.append(op)

    for op in operations:
        if not constant(op):
            place(op)
    order += [op for op in operations if id(op) not in placed]  # constants nothing reads (outputs)
    main.operations = order
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target(version),
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    model.save(str(out))
    return out


def split_unet(package: Path, scratch: Path) -> dict[str, Path]:
    """Bisect ``package`` into two ML Programs of about equal weight size: ``UnetChunk1``, ``UnetChunk2``."""
    import coremltools as ct

    folder = scratch / "chunks"
    folder.mkdir()
    try:
        spread = weights_beside_their_use(package, scratch / "Unet.spread.mlpackage")
        ct.models.utils.bisect_model(str(spread), str(folder), check_output_correctness=False)
    except Exception as exc:
        raise ExportError(f"splitting the UNet failed ({type(exc).__name__}: {exc}); package without --chunk-unet") \
            from exc
    chunks = {}
    for i in (1, 2):
        made = folder / f"{spread.stem}_chunk{i}.mlpackage"
        chunks[f"UnetChunk{i}"] = made.rename(scratch / f"UnetChunk{i}.mlpackage")
    shutil.rmtree(package)
    return chunks


def verify_chunks(whole: Path, chunk1: Path, chunk2: Path, unet: ComponentEntry) -> float:
    """Run the whole UNet and chunk 1 -> chunk 2 (chunk 1's outputs merged over the inputs, as the
    Swift pipeline chains them) on the same inputs; the largest absolute difference.

    Raises:
        ExportError: the chains differ by more than :data:`CHUNK_TOLERANCE`.
    """
    from diffship.runtimes.mil import MilReference

    rng = np.random.default_rng(0)
    feeds = {spec.name: rng.standard_normal(spec.shapes[0]).astype(np.float32)
             for spec in unet.details.model_inputs}
    feeds["timestep"] = np.full_like(feeds["timestep"], 500.0)
    full = MilReference(whole).run(feeds)
    first, second = MilReference(chunk1), MilReference(chunk2)
    merged = {**feeds, **{k: v.numpy() for k, v in first.run({n: feeds[n] for n in first.inputs}).items()}}
    chained = second.run({n: merged[n] for n in second.inputs})
    (name,) = full
    error = float((full[name].float() - next(iter(chained.values())).float()).abs().max())
    if not error <= CHUNK_TOLERANCE:
        raise ExportError(f"the chained UNet chunks differ from the whole UNet by {error:.3g} (more than "
                          f"{CHUNK_TOLERANCE}); package without --chunk-unet and report it")
    return error


def _write_vocabulary(tokenizer: Path, folder: Path) -> None:
    """CLIP's ``vocab.json`` and ``merges.txt`` for the Swift BPE tokenizer (exports carry them; older
    exports have only ``tokenizer.json``, rebuilt then)."""
    try:
        files = bpe_files(tokenizer)
    except SourceError as exc:
        raise DiffshipError(f"{exc}; the Swift pipeline's tokenizer needs CLIP's vocabulary: re-export") from None
    for name, text in files.items():
        atomic_write(folder / name, text)


def _compile(package: Path, folder: Path) -> None:
    proc = subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), str(folder)], capture_output=True,
                          text=True)
    if proc.returncode != 0 or not (folder / f"{package.stem}.mlmodelc").is_dir():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"xcrun coremlcompiler could not compile {package.name} ({tail})")


def _compile_script() -> str:
    return ("#!/bin/sh\n"
            "# Compile these Core ML packages into the .mlmodelc the Swift StableDiffusionPipeline loads (macOS, "
            "Xcode).\n"
            'cd "$(dirname "$0")" && for p in *.mlpackage; do xcrun coremlcompiler compile "$p" . && rm -rf "$p"; '
            "done\n")


#: what Apple's Swift schedulers hard-code (PNDM, DPM-Solver++ and Euler ancestral alike: Scheduler.swift),
#: and the decoder's default latent scale factor (StableDiffusionPipeline.Configuration).
SWIFT_SCHEDULER = {"prediction_type": "epsilon", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                   "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1}
SWIFT_DECODER_SCALE = 0.18215


def _scheduler_notes(exported: Path) -> list[str]:
    """Where the Swift pipeline will compute differently from the export's own configs: every value its
    schedulers hard-code, and the latent scale factor its decoder assumes."""
    notes = []
    config_path = exported / "scheduler" / "scheduler_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    for key, swift in SWIFT_SCHEDULER.items():
        value = config.get(key, swift)
        if value != swift and not (isinstance(swift, float) and isinstance(value, (int, float))
                                   and abs(value - swift) <= 1e-9):
            notes.append(f"the scheduler config sets {key} = {value}; the Swift pipeline's schedulers use {swift}")
    decoder = exported / "vae_decoder" / "config.json"
    scale = read_json(decoder).get("scaling_factor", SWIFT_DECODER_SCALE) if decoder.is_file() else SWIFT_DECODER_SCALE
    if abs(scale - SWIFT_DECODER_SCALE) > 1e-9:
        notes.append(f"the VAE's latent scale factor is {scale}; the Swift pipeline decodes with "
                     f"{SWIFT_DECODER_SCALE} unless the app sets StableDiffusionPipeline.Configuration's "
                     f"decoderScaleFactor (and encoderScaleFactor) to {scale}")
    return notes

"""Exports written by other tools, read as diffship manifests: optimum-onnx and optimum-intel folders,
and Apple's Core ML folders (:mod:`diffship.backends.apple`).

``optimum-cli export onnx`` and ``optimum-cli export openvino`` write the diffusers layout diffship
writes (``model_index.json``; ``text_encoder/``, ``unet/``, ``vae_encoder/``, ``vae_decoder/`` with
``config.json`` and ``model.onnx`` or ``openvino_model.xml`` + ``.bin``; tokenizers and scheduler), with
the same IO names, but no ``diffship.json``. :func:`foreign_manifest` describes such a folder as a
:class:`~diffship.backends.manifest.Manifest` whose ``origin`` names the tool: IO read from the models
themselves, the precision from their weights, no file hashes (nothing recorded them, so nothing is
verified: reports say so). Runners and parity then treat it like any export. What cannot be mapped
(another tool's layout, a component diffship has no spec for, models of two backends) is refused by name.
:func:`adopt` writes that manifest, with hashes, into the folder (``diffship adopt``), so later loads
verify its files like a diffship export's; for an Apple folder, which carries no configs, it also writes
those of the source it was converted from.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from diffship._files import read_json
from diffship.backends.manifest import MANIFEST, ComponentEntry, Manifest, Shapes, TensorIO
from diffship.errors import ExportedModelError, UnsupportedPipelineError
from diffship.reference.loader import SourceInfo
from diffship.reference.shapes import ShapeProfile
from diffship.reference.specs import vae_scale_factor

#: model file -> (diffship backend, the tool that writes that layout).
LAYOUTS = {"model.onnx": ("onnx", "optimum-onnx"), "openvino_model.xml": ("openvino", "optimum-intel")}
#: exported component -> the pipeline module it comes from.
SOURCES = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
           "vae_encoder": "vae", "vae_decoder": "vae"}


def foreign_manifest(folder: Path) -> Manifest | None:
    """A manifest describing the optimum or Apple export in ``folder``, or None where it is not laid out as one.

    Raises:
        ExportedModelError: a folder like theirs that diffship cannot map (mixed backends, unknown parts).
    """
    from diffship.backends import get
    from diffship.backends.apple import apple_manifest
    from diffship.reference.families import family_of

    apple = apple_manifest(folder)
    if apple is not None:
        return apple

    index_path = folder / "model_index.json"
    found = {sub.name: (file, LAYOUTS[file]) for sub in sorted(folder.iterdir()) if sub.is_dir()
             for file in LAYOUTS if (sub / file).is_file()}
    if not index_path.is_file() or not found:
        return None
    kinds = {layout for _, layout in found.values()}
    if len(kinds) > 1:
        raise ExportedModelError(f"{folder} holds models of {' and '.join(sorted(t for _, t in kinds))}; "
                                 f"diffship runs one backend per export")
    (backend, origin), = kinds
    unknown = sorted(set(found) - set(SOURCES))
    if unknown:
        raise ExportedModelError(f"{folder}: {origin} component(s) {', '.join(unknown)} have no diffship spec; "
                                 f"it maps {', '.join(SOURCES)}")
    index = read_json(index_path)
    if any(isinstance(v, list) and v[:1] == ["diffship"] for v in index.values()):
        return None  # diffship's own export without its manifest (unfinished, or tampered): never loaded
    try:
        family = family_of(index.get("_class_name", ""))
    except UnsupportedPipelineError as exc:
        raise ExportedModelError(f"{folder} ({origin} export): {exc}") from None
    get(backend).require(runtime=True)
    describe = _onnx_model if backend == "onnx" else _openvino_model
    components, precisions = {}, set()
    for name, (file, _) in found.items():
        inputs, outputs, precision, facts = describe(folder / name / file)
        details = get(backend).parse_details(facts, f"{folder}: {name}")
        files = sorted(p.relative_to(folder / name).as_posix() for p in (folder / name).rglob("*") if p.is_file())
        components[name] = ComponentEntry(component=name, source=SOURCES[name], precision=precision, files=files,
                                          inputs=inputs, outputs=outputs, details=details)
        precisions.add(precision)
    configs = {c.source: read_json(folder / n / "config.json") for n, c in components.items()
               if (folder / n / "config.json").is_file()}
    precision = _overall(precisions)
    source = SourceInfo(name=str(index.get("_name_or_path") or folder.name), kind="foreign", path=str(folder),
                        pipeline_class=index["_class_name"], fingerprint="")
    return Manifest(backend=backend, precision=precision, family=family.name, pipeline_class=index["_class_name"],
                    tasks=family.tasks_for(components, configs), source=source,
                    shapes=Shapes(static=False, profile=_native_size(configs)), components=components,
                    versions={}, origin=origin)


def adopt(folder: Path, source: str | None = None) -> Manifest:
    """Write a ``diffship.json`` beside the foreign export in ``folder``: its IO and origin as
    :func:`foreign_manifest` reads them, the sha256 of every file (later loads verify them) and, given
    the ``source`` it was exported from, that source's fingerprint (parity then checks it). An Apple
    folder needs the source: its configs, scheduler and tokenizer are written beside the packages.

    Raises:
        ExportedModelError: no foreign export there, the folder already has a manifest (or, for an Apple
            folder, configs), or an Apple folder without ``source``.
    """
    import json

    from diffship._files import atomic_write
    from diffship.backends.apple import ORIGIN
    from diffship.reference.loader import fingerprint, resolve_source

    folder = Path(folder)
    if (folder / MANIFEST).exists():
        raise ExportedModelError(f"{folder} already has a {MANIFEST}; diffship adopts only exports without one")
    manifest = foreign_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        raise ExportedModelError(f"{folder} is not an optimum-onnx, optimum-intel or Apple Core ML export "
                                 f"(model_index.json and <component>/model.onnx or openvino_model.xml, or "
                                 f"torch2coreml's .mlpackage files); nothing to adopt")
    if manifest.origin == ORIGIN and source is None:
        raise ExportedModelError(f"{folder} ({ORIGIN}) carries no configs, scheduler or tokenizer; give the source it "
                                 f"was converted from: diffship adopt {folder} --source SOURCE")
    if source is not None:
        path, kind = resolve_source(source)
        manifest = replace(manifest, source=SourceInfo(name=str(source), kind=kind, path=str(path.resolve()),
                                                       pipeline_class=manifest.pipeline_class,
                                                       fingerprint=fingerprint(path)))
    if manifest.origin == ORIGIN:
        manifest = _write_configs(folder, manifest, source)
    done = manifest.completed(folder)
    atomic_write(folder / MANIFEST, json.dumps(done.to_dict(), indent=2, default=str) + "\n", replace=False)
    return done


def _write_configs(folder: Path, manifest: Manifest, source: str) -> Manifest:
    """Write the configs, scheduler and tokenizer of ``source`` beside an Apple folder's packages (staged,
    then moved in; nothing there is replaced), and list each component's config among its files."""
    import shutil
    import tempfile

    from diffship.backends.apple import write_pipeline_configs
    from diffship.reference.loader import load

    pipe = load(source)
    with tempfile.TemporaryDirectory(prefix=".diffship-adopt-", dir=folder) as staging:
        write_pipeline_configs(pipe, Path(staging), manifest)
        names = sorted(p.name for p in Path(staging).iterdir())
        if taken := [n for n in names if (folder / n).exists()]:
            raise ExportedModelError(f"{folder} already holds {', '.join(taken)}; diffship adopt writes them from the "
                                     f"source: move them away first")
        for name in names:
            shutil.move(str(Path(staging) / name), str(folder / name))
    components = {n: replace(e, files=sorted(p.name for p in (folder / n).iterdir()))
                  for n, e in manifest.components.items()}
    return replace(manifest, components=components)


def _native_size(configs: dict[str, dict[str, Any]]) -> ShapeProfile:
    """The request shape a parity or bench run defaults to: the model's own image size."""
    unet, vae = configs.get("unet", {}), configs.get("vae", {})
    if not unet.get("sample_size") or not vae:
        return ShapeProfile()
    size = int(unet["sample_size"]) * vae_scale_factor(vae)
    return ShapeProfile(height=size, width=size)


def _overall(precisions: set[str]) -> str:
    """The export's precision: its components' lowest (a VAE kept in fp32 does not make it fp32)."""
    for p in ("int4", "hybrid-int8", "int8", "fp16", "bf16"):
        if p in precisions:
            return p
    return "fp32"


def _dims(name: str, dims: list[Any]) -> list[int | str]:
    """Fixed sizes as ints, named dims by name; an unnamed dynamic axis gets a name of its own (named dims
    must agree across inputs, unnamed ones need not)."""
    return [d if isinstance(d, int) and d > 0 else d if isinstance(d, str) and d else f"{name}_{axis}"
            for axis, d in enumerate(dims)]


def _onnx_model(path: Path) -> tuple[tuple[TensorIO, ...], tuple[TensorIO, ...], str, dict[str, Any]]:
    """IO, precision (float16 weights: fp16) and details (opset, external data) of an ONNX model, without
    loading external weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportedModelError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None

    def io(values) -> tuple[TensorIO, ...]:
        return tuple(TensorIO(name=v.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                              dims=_dims(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]))
                     for v in values)

    types = {t.data_type for t in model.graph.initializer}
    precision = "fp16" if onnx.TensorProto.FLOAT16 in types else "fp32"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    return io(model.graph.input), io(model.graph.output), precision, {"opset": opset, "external_data": external}


def _openvino_model(path: Path) -> tuple[tuple[TensorIO, ...], tuple[TensorIO, ...], str, dict[str, Any]]:
    """IO and precision of an OpenVINO IR: FakeQuantize ops make it hybrid-int8, 4-bit weights
    int4, 8-bit weights int8, f16 weights fp16."""
    import openvino as ov

    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:
        raise ExportedModelError(f"{path} is not a readable OpenVINO IR ({type(exc).__name__}: {exc})") from None

    def io(ports) -> tuple[TensorIO, ...]:
        return tuple(TensorIO(name=p.get_any_name(), dtype=p.get_element_type().to_dtype().name,
                              dims=_dims(p.get_any_name(), [d.get_length() if d.is_static else None
                                                            for d in p.get_partial_shape()]))
                     for p in ports)

    ops = model.get_ops()
    types = {op.get_type_name() for op in ops}
    constants = {op.get_output_element_type(0).get_type_name() for op in ops if op.get_type_name() == "Constant"}
    if "FakeQuantize" in types:
        precision = "hybrid-int8"
    elif constants & {"u4", "i4"}:
        precision = "int4"
    elif constants & {"u8", "i8"}:
        precision = "int8"
    elif "f16" in constants:
        precision = "fp16"
    else:
        precision = "fp32"
    hybrid = precision == "hybrid-int8"
    facts = {"weights": "int8" if hybrid else precision,
             "activations": "int8 (FakeQuantize: optimum-intel's hybrid quantization)" if hybrid else None}
    return io(model.inputs), io(model.outputs), precision, facts

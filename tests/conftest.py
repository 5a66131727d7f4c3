"""Shared fixtures: a private cache with the tiny pipeline, and one export per backend per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs two workers on this 2-core machine: one compute thread each (torch reads these at
        # import), or their OpenMP pools spin against each other and both run slower than one alone.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")
    # Tests never touch the user's cache: the tiny pipeline is built afresh (seconds) for each session.
    if "DIFFSHIP_CACHE" not in os.environ:
        root = Path(config.rootpath) / ".pytest_cache" / "diffship-cache"
        os.environ["DIFFSHIP_CACHE"] = str(root)


def mlpackage_io(package) -> tuple[list, list]:
    """(inputs, outputs) of a Core ML package's model description, as (name, shape, data type) each."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))

    def describe(features):
        return [(f.name, list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in features]

    return describe(spec.description.input), describe(spec.description.output)


def runnable_backends() -> list:
    """Backends that can both export and run here with dynamic shapes, each with its marker.

    Backends whose exports have fixed shapes (Core ML: ``fixed_shapes``) cannot take the sizes and
    batches the interface tests vary; their own tests run the interface at the export's size."""
    from diffship import backends

    return [pytest.param(b, marks=getattr(pytest.mark, b)) for b in backends.installed()
            if backends.runtime_unavailable_reason(b) is None and not backends.get(b).fixed_shapes]


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from diffship.reference import tiny_path

    return tiny_path()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    """The eager tiny pipeline (shared: do not modify it in tests)."""
    from diffship.reference import load

    return load("tiny")


def _shared_export(tmp_path_factory, key: tuple, build) -> Path:
    """The folder of the export ``key``, made once per test session by ``build(folder)`` and shared by both
    test workers (a file lock: the second worker waits for the first instead of exporting it again).
    Shared exports are read-only to tests; a test that changes one works on a copy."""
    import hashlib

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    name = "-".join(str(k) for k in key[:3]) + "-" + hashlib.sha256(repr(key).encode()).hexdigest()[:8]
    folder = root / "shared-exports" / name / "export"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent) + ".lock"):
        if not (folder / "diffship.json").is_file():
            build(folder)  # written atomically: a failed export leaves no folder, and the next caller retries
    return folder


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    """``export_dir(backend, precision="fp32", **kwargs)``: a session-shared export of ``tiny``."""
    from diffship.workflows import export_pipeline

    def make(backend: str, precision: str = "fp32", **kwargs) -> Path:
        return _shared_export(tmp_path_factory, ("tiny", backend, precision, tuple(sorted(kwargs.items()))),
                              lambda out: export_pipeline("tiny", out, backend=backend, precision=precision, **kwargs))

    return make


@pytest.fixture(scope="session")
def cli_export(tmp_path_factory):
    """``cli_export(preset, backend)``: ``diffship export PRESET OUT --backend B`` through the CLI, once per
    session (each family's CLI, runtime and packaging tests share it; ``tiny``'s is ``export_dir``'s fp32)."""
    from diffship.cli import main

    def build(preset: str, backend: str, out: Path) -> None:
        assert main(["export", preset, str(out), "--backend", backend]) == 0

    return lambda preset, backend: _shared_export(tmp_path_factory, (preset, backend, "fp32", ()),
                                                  lambda out: build(preset, backend, out))


@pytest.fixture(scope="session")
def cli_pipeline(cli_export):
    """``cli_pipeline(preset, backend)``: ``load_pipeline`` of ``cli_export(preset, backend)``, loaded once per
    session, progress bar off (shared: tests build their own pipeline from its components to change it)."""
    from diffship.runtimes.pipeline import load_pipeline

    loaded: dict[tuple[str, str], object] = {}

    def get(preset: str, backend: str):
        if (preset, backend) not in loaded:
            pipe = loaded[preset, backend] = load_pipeline(cli_export(preset, backend))
            pipe.set_progress_bar_config(disable=True)
        return loaded[preset, backend]

    return get


#: the backends each family's CLI export + parity test runs on, with their markers.
CLI_BACKENDS = [pytest.param(b, marks=getattr(pytest.mark, b)) for b in ("onnx", "openvino", "coreml")]


def cli_parity(preset: str, backend: str, cli_export, report_dir: Path, steps: int, components: set[str],
               min_image_psnr: float) -> None:
    """``diffship export PRESET OUT --backend B`` (the session's) then ``diffship parity PRESET OUT --steps N``:
    exit 0, every component judged, all three tasks run, images at least ``min_image_psnr``."""
    import json

    from diffship import backends
    from diffship.cli import main

    if backend not in backends.installed():
        pytest.skip(f"the {backend} extra is not installed")
    out = cli_export(preset, backend)
    assert main(["parity", preset, str(out), "--steps", str(steps), "--report", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert {c["component"] for c in report["components"]} == components
    assert {i["task"] for i in report["images"]} == {"text2img", "img2img", "inpaint"}
    assert min(i["metrics"]["psnr"] for i in report["images"]) >= min_image_psnr


@pytest.fixture(scope="session")
def sdxl_export(cli_export):
    """``sdxl_export(backend)``: the CLI export of ``tiny-sdxl`` (see ``cli_export``)."""
    return lambda backend: cli_export("tiny-sdxl", backend)


@pytest.fixture(params=runnable_backends())
def backend(request) -> str:
    """Every backend that exports and runs on this machine (interface tests run once per backend)."""
    return request.param


#: the source pipeline's model_index.json entries as optimum-cli keeps them.
OPTIMUM_INDEX = {"scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}


@pytest.fixture(scope="session")
def optimum_layout():
    """``optimum_layout(export, folder)``: a copy of a diffship export of ``tiny`` as optimum-cli lays it
    out (checked against optimum-onnx 0.1 and optimum-intel 1.27 by ``scripts/interop-check``): the same
    files without ``diffship.json``, the source pipeline's ``model_index.json``."""
    import shutil

    from diffship._files import read_json, write_json
    from diffship.backends.manifest import MANIFEST

    def make(export: Path, folder: Path) -> Path:
        shutil.copytree(export, folder)
        (folder / MANIFEST).unlink()
        index = read_json(folder / "model_index.json")
        write_json(folder / "model_index.json", {**{k: v for k, v in index.items() if k.startswith("_")
                                                    or not isinstance(v, list)}, **OPTIMUM_INDEX,
                                                 "_name_or_path": "tiny", "safety_checker": [None, None]})
        return folder

    return make


@pytest.fixture
def exported(backend, export_dir) -> Path:
    """The fp32 export of ``tiny`` for ``backend``."""
    return export_dir(backend)


@pytest.fixture(scope="session")
def hot_vae_source(tmp_path_factory, tiny_pipe) -> Path:
    """A copy of ``tiny`` whose VAE decoder overflows fp16 (activations past 65504) and does not ask
    for fp32 (no ``force_upcast``), for the reduced-precision fallback tests."""
    import copy

    import torch
    from diffusers import StableDiffusionPipeline

    vae = copy.deepcopy(tiny_pipe.vae)
    vae.register_to_config(force_upcast=False)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e6)
    src = tmp_path_factory.mktemp("hot-vae") / "pipeline"
    StableDiffusionPipeline(**{**tiny_pipe.components, "vae": vae}, requires_safety_checker=False).save_pretrained(src)
    return src

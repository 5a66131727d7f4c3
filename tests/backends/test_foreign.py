"""Exports other tools wrote: optimum-onnx and optimum-intel folders, without a diffship manifest.

The folders are laid out as ``optimum-cli export onnx|openvino`` writes them (checked against optimum-
onnx 0.1 and optimum-intel 1.27 by ``scripts/interop-check``, which installs them): diffship's own export
files, without ``diffship.json``, with the source pipeline's ``model_index.json``. optimum is not needed.
"""

from __future__ import annotations

import shutil

import pytest

from diffship.backends.manifest import MANIFEST, read_manifest
from diffship.errors import ExportedModelError

ORIGINS = {"onnx": "optimum-onnx", "openvino": "optimum-intel"}


@pytest.fixture(scope="module", params=["onnx", "openvino"])
def foreign(request, export_dir, tmp_path_factory, optimum_layout):
    backend = request.param
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino"}[backend])
    return backend, optimum_layout(export_dir(backend), tmp_path_factory.mktemp(backend) / "optimum")


def test_an_optimum_folder_reads_as_a_manifest_naming_its_origin(foreign):
    backend, folder = foreign
    m = read_manifest(folder)
    assert m.origin == ORIGINS[backend] and m.backend == backend and m.precision == "fp32"
    assert m.files == {} and m.source.fingerprint == "" and m.source.kind == "foreign"
    assert m.tasks == ["text2img", "img2img", "inpaint"] and m.family == "stable-diffusion"
    assert set(m.components) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert m.components["vae_decoder"].source == "vae" and "config.json" in m.components["unet"].files
    assert [t.name for t in m.components["unet"].inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert m.components["text_encoder"].inputs[0].dtype == "int64"
    assert (m.shapes.profile.height, m.shapes.profile.width) == (64, 64)  # the model's own size


def test_parity_checks_an_optimum_folder_and_says_it_is_unverified(foreign):
    from diffship.parity.compare import ParitySettings, check_parity

    backend, folder = foreign
    report = check_parity("tiny", folder, settings=ParitySettings(steps=3, tasks=("text2img",)))
    assert report.passed, report.failures()
    assert f"{ORIGINS[backend]} export, no diffship manifest: files and source not verified" in report.evaluator


def test_weight_compressed_openvino_folders_read_as_int8(export_dir, tmp_path, optimum_layout):
    pytest.importorskip("openvino")
    m = read_manifest(optimum_layout(export_dir("openvino", "int8"), tmp_path / "int8"))
    assert m.origin == "optimum-intel" and m.precision == "int8"
    assert m.components["unet"].details.weights == "int8"


def test_folders_diffship_cannot_map_are_refused_by_name(export_dir, tmp_path, optimum_layout):
    pytest.importorskip("onnxruntime")
    folder = optimum_layout(export_dir("onnx"), tmp_path / "mixed")
    (folder / "unet" / "openvino_model.xml").write_text("<net/>")
    with pytest.raises(ExportedModelError, match="holds models of optimum-intel and optimum-onnx; diffship runs one"):
        read_manifest(folder)
    folder = optimum_layout(export_dir("onnx"), tmp_path / "transformer")
    shutil.copytree(folder / "unet", folder / "transformer")
    with pytest.raises(ExportedModelError, match="optimum-onnx component\\(s\\) transformer have no diffship spec"):
        read_manifest(folder)
    folder = optimum_layout(export_dir("onnx"), tmp_path / "nothing")
    for model in folder.glob("*/model.onnx"):
        model.unlink()
    with pytest.raises(ExportedModelError, match="is not a diffship export \\(no diffship.json\\)"):
        read_manifest(folder)


def test_adopt_writes_a_manifest_that_later_loads_verify(export_dir, tmp_path, capsys, optimum_layout):
    """``diffship adopt``: hashes for every file, the source's fingerprint, and only where none was."""
    pytest.importorskip("onnxruntime")
    from diffship.cli import main
    from diffship.parity.compare import ParitySettings, check_parity
    from diffship.reference.loader import fingerprint, resolve_source

    folder = optimum_layout(export_dir("onnx"), tmp_path / "adopted")
    assert main(["adopt", str(folder), "--source", "tiny"]) == 0
    assert "adopted" in capsys.readouterr().out and (folder / MANIFEST).is_file()
    m = read_manifest(folder)  # verifies every file
    assert m.origin == "optimum-onnx" and len(m.files) > 10 and "unet/model.onnx" in m.files
    assert m.source.fingerprint == fingerprint(resolve_source("tiny")[0])
    report = check_parity("tiny", folder, settings=ParitySettings(steps=2, tasks=("text2img",)))
    assert report.passed and report.evaluator.endswith("optimum-onnx export adopted by diffship")
    assert main(["adopt", str(folder)]) == 2  # never overwrites a manifest
    assert "already has a diffship.json" in capsys.readouterr().err
    with open(folder / "unet" / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(ExportedModelError, match="unet/config.json does not match the sha256"):
        read_manifest(folder)
    assert main(["adopt", str(tmp_path / "nothing-here")]) == 2

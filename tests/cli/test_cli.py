"""The command line: each command end to end, and every bad input as one line and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest

from diffship.cli import main

pytestmark = pytest.mark.onnx
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("diffship: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def cli_export(cli_export):
    """``diffship export tiny OUT --backend onnx`` (the session's, see conftest)."""
    return cli_export("tiny", "onnx")


def test_export_prints_summary(cli_export, capsys):
    # The module fixture already exported; a second export to the same folder needs --overwrite.
    code, _, err = run(capsys, "export", "tiny", cli_export)
    assert code == 2
    assert "already exists; remove it or pass --overwrite" in one_error_line(err)


def test_parity_passes_and_writes_reports(cli_export, tmp_path, capsys):
    report_dir, junit = tmp_path / "report", tmp_path / "junit.xml"
    code, out, _ = run(capsys, "parity", "tiny", cli_export, "--steps", "4", "--report", report_dir, "--junit", junit)
    assert code == 0, out
    assert "parity passed" in out
    data = json.loads((report_dir / "report.json").read_text())
    assert data["schema"] == "diffship.parity/1" and data["passed"] is True
    assert {c["component"] for c in data["components"]} == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    # Acceptance: fp32 images >= 40 dB, every component output within 1e-4.
    assert all(i["metrics"]["psnr"] == "inf" or i["metrics"]["psnr"] >= 40 for i in data["images"])
    assert all(o["metrics"]["max_abs"] <= 1e-4 for c in data["components"] for o in c["outputs"])
    html = (report_dir / "index.html").read_text()
    for image in data["images"]:
        for kind in ("eager", "exported", "diff"):
            assert (report_dir / image["files"][kind]).is_file()
            assert image["files"][kind] in html
    assert (report_dir / "report.md").read_text().startswith("# diffship parity")
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0" and int(suite.get("tests")) == len(suite.findall("testcase")) >= 6


def test_parity_fails_with_exit_1_on_a_perturbed_weight(cli_export, tmp_path, capsys):
    """One UNet weight changed (and the manifest re-hashed, as a buggy exporter would leave it)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from diffship.backends.manifest import read_manifest

    bad = tmp_path / "bad"
    shutil.copytree(cli_export, bad)
    model = onnx.load(bad / "unet" / "model.onnx")
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, bad / "unet" / "model.onnx")
    read_manifest(bad, verify=False).write(bad)
    junit = tmp_path / "junit.xml"
    code, out, err = run(capsys, "parity", "tiny", bad, "--steps", "4", "--junit", junit)
    assert code == 1
    assert "unet/out_sample" in one_error_line(err) and "parity failed" in err
    assert "FAIL" in out
    suite = ET.parse(junit).getroot()
    assert int(suite.get("failures")) >= 1
    failed = [tc.get("name") for tc in suite.findall("testcase") if tc.find("failure") is not None]
    assert "component:unet/out_sample" in failed


def test_inspect_shows_components_and_verifies(cli_export, capsys):
    code, out, _ = run(capsys, "inspect", cli_export)
    assert code == 0
    for text in ("StableDiffusionPipeline", "unet", "out_sample", "latent_height", "encoder_hidden_states",
                 "verified"):
        assert text in out
    code, out, _ = run(capsys, "inspect", cli_export, "--json")
    assert code == 0 and json.loads(out)["backend"] == "onnx"


def test_inspect_refuses_tampered_export(cli_export, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(cli_export, copy)
    path = copy / "text_encoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, "inspect", copy)
    assert code == 2
    assert "text_encoder/model.onnx does not match the sha256" in one_error_line(err)


def test_generate_writes_images(cli_export, tmp_path, capsys):
    out_dir = tmp_path / "images"
    code, out, _ = run(capsys, "generate", cli_export, "--prompt", "a red fox", "--negative-prompt", "blurry",
                       "--steps", "3", "--size", "64x96", "--scheduler", "EulerDiscreteScheduler",
                       "--num-images", "2", "--seed", "7", "--out", out_dir)
    assert code == 0
    from PIL import Image

    files = sorted(out_dir.glob("*.png"))
    assert [f.name for f in files] == ["seed7-0.png", "seed7-1.png"]
    assert Image.open(files[0]).size == (96, 64)


@pytest.mark.parametrize("args, message", [
    (["export", "/no/such/folder", "OUT"], "/no/such/folder: no such file or folder, and not a built-in preset (tiny, sd15-arch, tiny-sdxl, tiny-sd3, tiny-flux, tiny-flux-fill, tiny-flux-kontext, sdxl-arch, sd3-arch, flux-arch)"),
    (["export", "tiny", "OUT", "--backend", "nope"], "unknown backend 'nope'; choose one of:"),
    (["export", "tiny", "OUT", "--static", "100x64"], "height 100 is not a positive multiple of 8"),
    (["export", "tiny", "OUT", "--precision", "int3"], "unknown precision 'int3'"),
    (["inspect", "/no/such/export"], "/no/such/export: no such folder"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_not_a_diffusers_folder(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.txt").write_text("hello")
    code, _, err = run(capsys, "export", tmp_path / "src", tmp_path / "out")
    assert code == 2
    assert "is not a diffusers pipeline folder (no model_index.json)" in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_unsupported_pipeline_class_names_supported_ones(tmp_path, capsys):
    src = tmp_path / "flux"
    src.mkdir()
    (src / "model_index.json").write_text(json.dumps({"_class_name": "FluxControlPipeline"}))
    code, _, err = run(capsys, "export", src, tmp_path / "out")
    assert code == 2
    line = one_error_line(err)
    assert "'FluxControlPipeline' is not supported" in line and "StableDiffusionPipeline" in line


def test_pickle_weights_need_the_flag(tmp_path, tiny_dir, capsys):
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "pickled"
    shutil.copytree(tiny_dir, src)
    for f in list(src.rglob("*.safetensors")):
        torch.save(load_file(f), f.with_name(f.name.replace(".safetensors", ".bin").replace("model.bin", "pytorch_model.bin")
                                             if f.parent.name == "text_encoder" else f.name.replace(".safetensors", ".bin")))
        f.unlink()
    code, _, err = run(capsys, "export", src, tmp_path / "out", "--component", "vae_decoder")
    assert code == 2 and "--allow-pickle" in one_error_line(err)
    code, _, err = run(capsys, "export", src, tmp_path / "out", "--component", "vae_decoder", "--allow-pickle")
    assert code == 0, err


def test_missing_backend_package_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnx" else real(n, *a))
    code, _, err = run(capsys, "export", "tiny", tmp_path / "out")
    assert code == 2
    assert "pip install 'diffship[onnx]'" in one_error_line(err)


def test_generate_bad_size_and_scheduler(cli_export, tmp_path, capsys):
    code, _, err = run(capsys, "generate", cli_export, "--prompt", "x", "--size", "60x64", "--out", tmp_path)
    assert code == 2 and "height 60 is not a positive multiple of 8" in one_error_line(err)
    code, _, err = run(capsys, "generate", cli_export, "--prompt", "x", "--scheduler", "FancyScheduler", "--out", tmp_path)
    line = one_error_line(err)
    assert code == 2 and "unknown or incompatible scheduler 'FancyScheduler'" in line and "EulerDiscreteScheduler" in line
    assert list(tmp_path.glob("*.png")) == []


def test_generate_outside_static_shape(tmp_path, capsys):
    out = tmp_path / "static"
    code, _, err = run(capsys, "export", "tiny", out, "--static", "64x64",
                       "--component", "text_encoder", "--component", "unet", "--component", "vae_decoder")
    assert code == 0, err
    code, _, err = run(capsys, "generate", out, "--prompt", "x", "--steps", "2", "--size", "128x128", "--out", tmp_path)
    line = one_error_line(err)
    assert code == 2 and "this export is static: 64x64 images, batch 1" in line


def test_interrupted_export_folder_is_refused(cli_export, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(cli_export, partial)
    (partial / "diffship.json").unlink()
    code, _, err = run(capsys, "generate", partial, "--prompt", "x")
    assert code == 2 and "not a diffship export (no diffship.json)" in one_error_line(err)


def test_debug_shows_traceback(capsys):
    code, _, err = run(capsys, "--debug", "inspect", "/no/such/export")
    assert code == 2
    assert "Traceback" in err and "diffship: error:" in err


def test_overwrite_only_replaces_exports(tmp_path, capsys):
    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "export", "tiny", precious, "--component", "vae_decoder", "--overwrite")
    assert code == 2 and "is not a diffship export" in one_error_line(err)
    assert (precious / "keep.txt").read_text() == "mine"


def test_unexpected_errors_exit_3(capsys, monkeypatch):
    import diffship.backends.manifest

    def boom(*args, **kwargs):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(diffship.backends.manifest, "read_manifest", boom)
    code, _, err = run(capsys, "inspect", "whatever")
    assert code == 3
    line = one_error_line(err)
    assert "unexpected RuntimeError: first line (re-run with --debug" in line and "second line" not in err


def test_backend_and_runtime_options(tmp_path, capsys):
    import onnx

    out = tmp_path / "opset17"
    code, _, err = run(capsys, "export", "tiny", out, "--component", "vae_decoder", "-o", "opset=17",
                       "-o", "external_data=true")
    assert code == 0, err
    model = onnx.load(out / "vae_decoder" / "model.onnx", load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert (out / "vae_decoder" / "model.onnx.data").is_file()
    code, _, err = run(capsys, "export", "tiny", tmp_path / "x", "-o", "fancy=1")
    assert code == 2 and "unknown onnx export option(s) fancy; it takes: opset, external_data" in one_error_line(err)
    code, _, err = run(capsys, "export", "tiny", tmp_path / "y", "-o", "novalue")
    assert code == 2 and "option 'novalue' is not KEY=VALUE" in one_error_line(err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_runtime_option_passthrough(cli_export, tmp_path, capsys):
    code, _, err = run(capsys, "generate", cli_export, "--prompt", "x", "--steps", "2", "--threads", "1",
                       "-o", 'session_config={"session.intra_op.allow_spinning": "0"}', "--out", tmp_path)
    assert code == 0, err
    code, _, err = run(capsys, "generate", cli_export, "--prompt", "x", "-o", "thread=2", "--out", tmp_path / "b")
    assert code == 2 and "unknown onnx runtime option(s) thread" in one_error_line(err)

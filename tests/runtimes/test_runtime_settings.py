"""Runtime settings in the manifest: a plain export records its backend's defaults, loads run with the
recorded settings unless the caller gives others, and parity, generate and bench report what ran."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from diffship.backends.manifest import MANIFEST, read_manifest
from diffship.errors import ExportedModelError
from diffship.parity.compare import ParitySettings, check_parity
from diffship.runtimes.pipeline import open_export

pytestmark = pytest.mark.openvino
pytest.importorskip("openvino", reason="the openvino extra is not installed")


def _with_runtime(src, dst, runtime):
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    replace(manifest, runtime=runtime).write(dst)
    return dst


def test_plain_export_records_the_defaults_it_runs_with(export_dir):
    m = read_manifest(export_dir("openvino"))
    assert m.runtime == {"device": "CPU", "inference_precision": "f32", "static_shapes": True}
    assert read_manifest(export_dir("onnx")).runtime == {}  # onnxruntime's own defaults: nothing set


def test_recorded_settings_run_unless_the_caller_says_otherwise(export_dir, tmp_path):
    out = _with_runtime(export_dir("openvino"), tmp_path / "bf16", {"inference_precision": "bf16"})
    with open_export(out) as loaded:
        assert loaded.settings["inference_precision"] == "bf16"
        assert loaded.runners["unet"].compute_precision == "bf16"
        assert "inference_precision=bf16" in loaded.describe_settings()
    with open_export(out, inference_precision="f32") as loaded:  # the caller's option wins
        assert loaded.runners["unet"].compute_precision is None and loaded.settings["inference_precision"] == "f32"
    report = check_parity("tiny", out, settings=ParitySettings(steps=2, tasks=("text2img",)))
    assert report.runtime["inference_precision"] == "bf16" and report.precision == "bf16"
    assert report.to_dict()["runtime"] == report.runtime


def test_a_malformed_runtime_setting_is_refused_on_read(export_dir, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(export_dir("openvino"), out)
    data = json.loads((out / MANIFEST).read_text())
    data["runtime"] = {"inference_precision": "bf16", "turbo": True}
    (out / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ExportedModelError, match="runtime: unknown openvino runtime option.*turbo"):
        read_manifest(out)


def test_generate_reports_the_settings_that_ran(export_dir, tmp_path, capsys):
    from diffship.cli import main

    assert main(["generate", str(export_dir("openvino")), "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path)]) == 0
    assert "ran openvino fp32 with device=CPU inference_precision=f32 static_shapes=True" in capsys.readouterr().out

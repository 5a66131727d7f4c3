"""The ONNX exporter and the export folder: layout, manifest, shapes, precisions, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.onnx
onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")

from diffship._files import read_json, sha256_file  # noqa: E402
from diffship.errors import DiffshipError, ExportedModelError, MissingBackendError, ShapeError  # noqa: E402
from diffship.workflows import export_pipeline  # noqa: E402
from diffship.backends.manifest import read_manifest  # noqa: E402
from diffship.runtimes.pipeline import load_pipeline  # noqa: E402

COMPONENTS = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_layout_mirrors_diffusers_and_optimum(export_dir):
    out = export_dir("onnx")
    for name in COMPONENTS:
        assert (out / name / "model.onnx").is_file()
        assert (out / name / "config.json").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    index = read_json(out / "model_index.json")
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffship", "onnx"] and index["scheduler"][1] == "PNDMScheduler"
    assert read_json(out / "vae_decoder" / "config.json")["scaling_factor"] == pytest.approx(0.18215)


def test_tokenizer_carries_the_slow_tokenizer_files(export_dir):
    """transformers 4 consumers (optimum) build CLIPTokenizer from vocab.json + merges.txt, which
    transformers 5 no longer saves: the export writes them, and they tokenize as tokenizer.json does."""
    from transformers import AutoTokenizer, CLIPTokenizer

    out = export_dir("onnx")
    folder = out / "tokenizer"
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt"} <= set(read_manifest(out).files)
    # Read as transformers 4's slow CLIPTokenizer reads them: a JSON vocabulary, merges after a version line.
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
              if line]
    slow = CLIPTokenizer(vocab=vocab, merges=merges)
    fast = AutoTokenizer.from_pretrained(folder)
    for prompt in ("a photograph of an astronaut riding a horse", "isometric pixel-art: 3 tiny cars, trees!"):
        assert slow(prompt).input_ids == fast(prompt).input_ids


def test_manifest_records_everything(export_dir, tiny_dir):
    out = export_dir("onnx")
    m = read_manifest(out)
    assert m.backend == "onnx" and m.precision == "fp32" and m.pipeline_class == "StableDiffusionPipeline"
    assert m.source.name == "tiny" and len(m.source.fingerprint) == 64
    assert m.to_dict()["shapes"] == {"static": False, "profile": {"batch_size": 1, "height": 64, "width": 64,
                                                                 "sequence_length": 77, "guidance": True}}
    assert {"torch", "diffusers", "transformers", "onnx", "python", "diffship"} <= set(m.versions)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "diffship.json"}
    assert set(m.files) == files
    assert m.files["unet/model.onnx"] == sha256_file(out / "unet" / "model.onnx")
    assert list(m.components) == COMPONENTS


def test_io_names_dims_and_opset(export_dir):
    out = export_dir("onnx")
    expected = {
        "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
        "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
        "vae_encoder": (["sample"], ["latent_parameters"]),
        "vae_decoder": (["latent_sample"], ["sample"]),
    }
    for name, (ins, outs) in expected.items():
        model = onnx.load(out / name / "model.onnx", load_external_data=False)
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == ins
        assert [o.name for o in model.graph.output] == outs
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    unet = onnx.load(out / "unet" / "model.onnx", load_external_data=False)
    assert _dims(unet.graph.input[0]) == ["batch", 4, "latent_height", "latent_width"]
    assert _dims(unet.graph.input[1]) == ["batch"]
    assert _dims(unet.graph.input[2]) == ["batch", "sequence", 32]
    assert _dims(unet.graph.output[0]) == ["batch", 4, "latent_height", "latent_width"]
    dec = onnx.load(out / "vae_decoder" / "model.onnx", load_external_data=False)
    assert _dims(dec.graph.output[0]) == ["batch", 3, "height", "width"]
    te = onnx.load(out / "text_encoder" / "model.onnx", load_external_data=False)
    assert te.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_dynamic_export_runs_other_shapes(export_dir, tiny_pipe):
    pipe = load_pipeline(export_dir("onnx"))
    x = torch.randn(3, 4, 12, 10)
    t = torch.tensor(321.0)
    emb = torch.randn(3, 77, 32)
    with torch.no_grad():
        want = tiny_pipe.unet(x, t, encoder_hidden_states=emb).sample
    got = pipe.unet(x, t, encoder_hidden_states=emb).sample
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)


def test_static_export_fixes_shapes_and_refuses_others(export_dir):
    out = export_dir("onnx", static=(64, 64), batch_size=1, components=["text_encoder", "unet", "vae_decoder"])
    m = read_manifest(out)
    assert m.shapes.static is True
    assert m.components["unet"].inputs[0].dims == [2, 4, 8, 8]
    unet = onnx.load(out / "unet" / "model.onnx", load_external_data=False)
    assert _dims(unet.graph.input[0]) == [2, 4, 8, 8]
    pipe = load_pipeline(out)
    image = pipe("a cat", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    with pytest.raises(ShapeError, match=r"static: 64x64 images, batch 1"):
        pipe("a cat", num_inference_steps=2, height=128, width=128)


def test_parity_of_a_partial_static_export_runs_what_it_can(export_dir):
    from diffship.parity.compare import ParitySettings, check_parity

    out = export_dir("onnx", static=(64, 64), batch_size=1, components=["text_encoder", "unet", "vae_decoder"])
    report = check_parity("tiny", out, settings=ParitySettings(steps=2))
    assert report.passed, report.failures()
    assert [i.task for i in report.images] == ["text2img"]  # no vae_encoder: img2img is skipped
    assert [c.component for c in report.components] == ["text_encoder", "unet", "vae_decoder"]


def test_fp16_export_keeps_vae_decoder_fp32_and_passes_parity(export_dir):
    from diffship.parity.compare import ParitySettings, check_parity

    out = export_dir("onnx", "fp16")
    m = read_manifest(out)
    assert m.components["unet"].precision == "fp16"
    assert m.components["unet"].inputs[0].dtype == "float16"
    assert m.components["unet"].inputs[1].dtype == "float32"  # timesteps keep full precision
    assert m.components["vae_decoder"].precision == "fp32"
    assert "force_upcast" in m.components["vae_decoder"].details.fp32_fallback
    unet = onnx.load(out / "unet" / "model.onnx", load_external_data=False)
    assert unet.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    report = check_parity("tiny", out, settings=ParitySettings(steps=4, tasks=("text2img",)))
    assert report.passed, report.failures()
    assert report.precision == "fp16"
    # fp16 is measurably less exact than fp32, yet within its documented tolerance.
    assert max(o.metrics.max_abs for c in report.components for o in c.outputs) > 1e-5


def test_fp16_overflow_falls_back_to_fp32(tmp_path, hot_vae_source):
    """A decoder whose activations pass fp16's range (65504) is detected and exported in fp32."""
    src = hot_vae_source
    out = tmp_path / "export"
    m = export_pipeline(src, out, precision="fp16", components=["vae_decoder"])
    entry = m.components["vae_decoder"]
    assert entry.precision == "fp32"
    # found in the fp16 torch module before exporting (the ONNX export's outputs would be non-finite)
    assert entry.details.fp32_fallback.startswith("vae.decoder.conv_out overflows at fp16 on the example inputs")
    dec = onnx.load(out / "vae_decoder" / "model.onnx", load_external_data=False)
    assert dec.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_external_data_is_written_and_loads(tmp_path, tiny_pipe):
    from diffship.backends.onnx import OnnxExportOptions
    from diffship.exporters import ExportOptions
    from diffship.exporters.onnx import EXTERNAL_DATA_BYTES, export, needs_external_data
    from diffship.reference import ShapeProfile, specs_for_pipeline
    from diffship.runtimes import open_runner

    spec = next(s for s in specs_for_pipeline(tiny_pipe) if s.name == "vae_decoder")
    module = spec.wrapper(tiny_pipe.vae).eval()
    assert not needs_external_data(module, None)  # a few MB: inline
    assert needs_external_data(module, True)
    assert EXTERNAL_DATA_BYTES < 2 * 1024**3
    options = ExportOptions(profile=ShapeProfile(height=64, width=64), backend=OnnxExportOptions(external_data=True))
    entry = export(spec, module, tmp_path / "vae_decoder", options)
    assert entry.details.external_data is True
    assert sorted(entry.files) == ["model.onnx", "model.onnx.data"]
    graph, data = (tmp_path / "vae_decoder" / f for f in entry.files)
    assert graph.stat().st_size * 4 < data.stat().st_size  # the weights live outside the graph
    runner = open_runner("onnx", tmp_path / "vae_decoder", entry)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = module(z)
    np.testing.assert_allclose(runner.infer({"latent_sample": z})["sample"].numpy(), want.numpy(), atol=1e-4)


def test_the_checker_can_be_skipped_and_the_manifest_says_so(tmp_path, monkeypatch):
    """``-o check=false``: no onnx.checker child, and the manifest says the graph was not checked."""
    import diffship.exporters.onnx as onnx_exporter

    def refuse(*args, **kwargs):
        raise AssertionError("the checker ran")

    monkeypatch.setattr(onnx_exporter, "run_isolated", refuse)
    manifest = export_pipeline("tiny", tmp_path / "out", backend="onnx", components=["vae_decoder"],
                               backend_options={"check": False})
    assert manifest.components["vae_decoder"].details.checked is False
    with pytest.raises(AssertionError, match="the checker ran"):
        export_pipeline("tiny", tmp_path / "checked", backend="onnx", components=["vae_decoder"])


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import diffship.exporters.onnx as onnx_exporter

    real = onnx_exporter.export
    calls = []

    def interrupted(spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the UNet
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(onnx_exporter, "export", interrupted)
    out = tmp_path / "export"
    with pytest.raises(KeyboardInterrupt):
        export_pipeline("tiny", out, components=["text_encoder", "unet"])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder left either


def test_killed_export_folder_does_not_load(tmp_path, export_dir):
    """A folder without its manifest (as a killed export leaves it) is refused."""
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(export_dir("onnx"), partial)
    (partial / "diffship.json").unlink()
    with pytest.raises(ExportedModelError, match="no diffship.json.*unfinished export"):
        load_pipeline(partial)


def test_tampered_file_is_refused(tmp_path, export_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(export_dir("onnx"), copy)
    load_pipeline(copy)  # intact: loads
    with open(copy / "vae_decoder" / "model.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ExportedModelError, match=r"vae_decoder/model.onnx does not match the sha256"):
        load_pipeline(copy)
    (copy / "unet" / "config.json").unlink()
    with pytest.raises(ExportedModelError, match=r"unet/config.json is missing"):
        read_manifest(copy)


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(DiffshipError, match="already exists.*--overwrite"):
        export_pipeline("tiny", out, components=["text_encoder"])


def test_missing_backend_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(MissingBackendError, match=r"pip install 'diffship\[onnx\]'"):
        export_pipeline("tiny", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_backend_and_precision(tmp_path):
    with pytest.raises(DiffshipError, match="unknown backend 'nope'; choose one of: .*onnx"):
        export_pipeline("tiny", tmp_path / "a", backend="nope")
    with pytest.raises(DiffshipError, match="unknown precision 'int3' for onnx; choose one of: fp32, fp16"):
        export_pipeline("tiny", tmp_path / "b", precision="int3")


def test_manifest_is_json_with_format(export_dir):
    data = json.loads((export_dir("onnx") / "diffship.json").read_text())
    assert data["format"] == "diffship.export/1"


def test_manifest_missing_keys_is_refused(tmp_path, export_dir):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(export_dir("onnx"), old)
    data = json.loads((old / "diffship.json").read_text())
    del data["tasks"]
    (old / "diffship.json").write_text(json.dumps(data))
    with pytest.raises(ExportedModelError, match=r"lacks tasks \(written by an older diffship\?\); re-export"):
        load_pipeline(old)

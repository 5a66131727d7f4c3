"""OpenVINO: IR layout, weight formats with their measured tolerances, runtime options, shape cache.

The pipeline-interface tests (tests/runtimes/test_pipeline_interface.py) run against OpenVINO too,
through the ``backend`` fixture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.openvino
pytest.importorskip("openvino", reason="the openvino extra is not installed")

from diffship.errors import DiffshipError  # noqa: E402
from diffship.workflows import export_pipeline  # noqa: E402
from diffship.backends.manifest import read_manifest  # noqa: E402
from diffship.parity.compare import ParitySettings, check_parity  # noqa: E402
from diffship.reference import load  # noqa: E402
from diffship.reference.pipelines import specs_for_pipeline  # noqa: E402
from diffship.runtimes.pipeline import load_pipeline, open_export  # noqa: E402

FAST = ParitySettings(steps=4, tasks=("text2img",))


def test_layout_and_manifest(export_dir):
    out = export_dir("openvino")
    m = read_manifest(out)
    assert m.backend == "openvino" and "openvino" in m.versions
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert sorted(m.components[name].files) == ["openvino_model.bin", "openvino_model.xml"]
        assert (out / name / "config.json").is_file()
    import openvino as ov

    unet = ov.Core().read_model(out / "unet" / "openvino_model.xml")
    assert [p.get_any_name() for p in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert [p.get_any_name() for p in unet.outputs] == ["out_sample"]
    assert unet.inputs[0].get_partial_shape().is_dynamic


def test_fp32_parity_meets_the_onnx_bar(export_dir):
    report = check_parity("tiny", export_dir("openvino"), settings=ParitySettings(steps=4))
    assert report.passed, report.failures()
    assert "f32" in report.evaluator
    assert max(o.metrics.max_abs for c in report.components for o in c.outputs) <= 1e-4
    assert min(i.metrics.psnr for i in report.images) >= 40


@pytest.mark.parametrize("precision, ratio", [("fp16", 0.6), ("int8", 0.4), ("int4", 0.3)])
def test_weight_formats_pass_their_tolerances(export_dir, precision, ratio):
    out = export_dir("openvino", precision)
    m = read_manifest(out)
    assert m.components["unet"].details.weights == precision
    assert m.components["unet"].details.activations is None
    if precision == "int4":  # 4-bit groups on the UNet's matrix products; CLIP and the VAE 8-bit
        assert m.components["text_encoder"].precision == "int8"
        assert "int4" not in {m.components[c].precision for c in ("vae_encoder", "vae_decoder")}
        assert m.components["unet"].details.int4.split()[0] != "0"
    assert m.components["unet"].inputs[0].dtype == "float32"  # IO stays f32 whatever the weights
    fp32_size = (export_dir("openvino") / "unet" / "openvino_model.bin").stat().st_size
    size = (out / "unet" / "openvino_model.bin").stat().st_size
    assert size < fp32_size * ratio
    report = check_parity("tiny", out, settings=FAST)
    assert report.passed, report.failures()
    assert report.precision == precision
    # Compressed weights are measurably different from fp32 -- the tolerance is doing work.
    assert report.components[1].outputs[0].metrics.max_abs > 1e-4


def test_bf16_speed_mode_is_judged_by_its_own_tolerance(export_dir):
    report = check_parity("tiny", export_dir("openvino"), settings=FAST,
                          runtime_options={"inference_precision": "bf16"})
    assert report.precision == "bf16" and "bf16" in report.evaluator
    assert report.passed, report.failures()


def test_f32_groups_keep_their_nodes_f32_under_bf16_inference(tmp_path):
    """``-o f32_groups``: the named layer groups' convolutions and matrix products are marked precise in the IR,
    and OpenVINO's CPU plugin computes them in f32 while the rest runs bf16 (where the CPU has bf16)."""
    import openvino as ov

    from diffship.bench.machine import bf16_native
    from diffship.errors import OptionError

    out = tmp_path / "marked"
    m = export_pipeline("tiny", out, backend="openvino", components=["unet"], backend_options={"f32_groups": "ends"})
    assert m.components["unet"].details.f32_nodes == "2 nodes of ends compute f32 under bf16 inference"  # conv_in, conv_out
    with pytest.raises(OptionError, match="unknown f32_groups group"):
        export_pipeline("tiny", tmp_path / "bad", backend="openvino", backend_options={"f32_groups": "vae-decoder"})
    if not bf16_native():
        pytest.skip("this CPU has no native bf16: OpenVINO computes f32 throughout, marked or not")
    compiled = ov.Core().compile_model(ov.Core().read_model(out / "unet" / "openvino_model.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "bf16"})
    convs = {op.get_friendly_name(): op.get_rt_info()["runtimePrecision"].astype(str)
             for op in compiled.get_runtime_model().get_ops() if op.get_rt_info()["layerType"].astype(str) == "Convolution"}
    ends = {name: p for name, p in convs.items() if "conv_in" in name or "conv_out" in name}
    assert len(ends) == 2 and set(ends.values()) == {"f32"}
    assert "bf16" in {p for name, p in convs.items() if name not in ends}  # the rest lowered as asked


def test_static_shapes_compile_once_per_shape(export_dir):
    loaded = open_export(export_dir("openvino"))
    pipe, unet = loaded.pipeline, loaded.runners["unet"]
    run = lambda h: pipe("a cat", num_inference_steps=3, height=h, width=64, output_type="np",  # noqa: E731
                         generator=torch.Generator().manual_seed(0)).images
    first = run(64)
    assert unet.compiles == 1  # three steps, one shape: compiled once
    again = run(64)
    assert unet.compiles == 1
    np.testing.assert_array_equal(first, again)
    assert run(96).shape == (1, 96, 64, 3)
    assert unet.compiles == 2
    dynamic = open_export(export_dir("openvino"), static_shapes=False)
    run_dynamic = dynamic.pipeline("a cat", num_inference_steps=3, height=96, width=64, output_type="np",
                                   generator=torch.Generator().manual_seed(0)).images
    assert dynamic.runners["unet"].compiles == 1
    np.testing.assert_allclose(run_dynamic, run(96), atol=1e-5)


def test_runtime_options_pass_through(export_dir, tmp_path):
    cache = tmp_path / "ov-cache"
    loaded = open_export(export_dir("openvino"), device="cpu", threads=1, cache_dir=str(cache),
                         ov_config={"NUM_STREAMS": "1"})
    runner = loaded.runners["vae_decoder"]
    assert runner.ov_device == "CPU" and runner.device == torch.device("cpu")  # OpenVINO device; torch tensors on the host
    assert runner.config["INFERENCE_NUM_THREADS"] == 1 and runner.config["NUM_STREAMS"] == "1"
    assert runner.config["PERFORMANCE_HINT"] == "LATENCY" and runner.config["INFERENCE_PRECISION_HINT"] == "f32"
    runner.infer({"latent_sample": torch.randn(1, 4, 8, 8)})
    assert any(cache.iterdir())  # OpenVINO wrote its model cache
    with pytest.raises(DiffshipError, match=r"unknown openvino runtime option\(s\) provider; it takes: device"):
        load_pipeline(export_dir("openvino"), provider="cpu")


def test_bad_device_and_options_are_one_error(export_dir, tmp_path):
    from diffship.errors import RuntimeFailure

    pipe = load_pipeline(export_dir("openvino"), device="NOSUCHDEVICE")
    with pytest.raises(RuntimeFailure, match="could not compile vae_decoder for NOSUCHDEVICE"):
        pipe.vae.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(DiffshipError, match="unknown openvino export option"):
        export_pipeline("tiny", tmp_path / "x", backend="openvino", backend_options={"weights": "int4"})
    with pytest.raises(DiffshipError, match="unknown precision 'int2' for openvino; choose one of: fp32, fp16, int8"):
        export_pipeline("tiny", tmp_path / "y", backend="openvino", precision="int2")


def test_hybrid_int8_quantizes_unet_activations_on_calibration_data(tmp_path, optimum_layout):
    out = tmp_path / "hybrid"
    m = export_pipeline("tiny", out, backend="openvino", precision="hybrid-int8",
                        components=["text_encoder", "unet", "vae_decoder"], calibration_steps=3)
    unet = m.components["unet"]
    assert unet.precision == "hybrid-int8" and unet.details.weights == "int8"
    # 4 calibration prompts x (3 steps, as asked, + PNDM's extra first step), one UNet call per step.
    assert unet.details.activations == "int8, calibrated on 16 recorded calls"
    assert m.components["text_encoder"].details.activations is None  # weights only
    xml = (out / "unet" / "openvino_model.xml").read_text()
    assert xml.count('type="FakeQuantize"') > 0  # activation quantizers are in the graph
    report = check_parity("tiny", out, settings=FAST)
    assert report.precision == "hybrid-int8"
    assert report.passed, report.failures()
    # The same folder as optimum-intel lays out its hybrid quantization (NNCF FakeQuantize in the UNet,
    # 8-bit weights elsewhere): read as hybrid-int8 without a manifest, judged by the same tolerances.
    foreign = optimum_layout(out, tmp_path / "optimum-hybrid")
    assert read_manifest(foreign).components["unet"].precision == "hybrid-int8"
    report = check_parity("tiny", foreign, settings=FAST)
    assert report.precision == "hybrid-int8" and "optimum-intel export" in report.evaluator
    assert report.passed, report.failures()


def test_static_export_has_static_ir(tmp_path):
    import openvino as ov

    out = tmp_path / "static"
    export_pipeline("tiny", out, backend="openvino", static=(64, 64), components=["text_encoder", "unet"])
    unet = ov.Core().read_model(out / "unet" / "openvino_model.xml")
    assert [list(p.get_shape()) for p in unet.inputs] == [[2, 4, 8, 8], [2], [2, 77, 32]]
    text = ov.Core().read_model(out / "text_encoder" / "openvino_model.xml")
    assert text.inputs[0].get_partial_shape().is_dynamic  # per prompt list: dynamic batch
    pipe = load_pipeline(out)
    assert pipe("a cat", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_dynamic_exports_are_traced_small_and_run_at_every_size(tmp_path, monkeypatch):
    """Tracing runs the module once at a small size (minutes saved on large models); the graph's image dims
    stay dynamic, so the export matches eager at the sizes it runs."""
    from diffship.exporters import openvino as exporter

    traced = []
    trace_profile = exporter.trace_profile
    monkeypatch.setattr(exporter, "TRACE_SIDE", 8)  # below tiny's 64 px
    monkeypatch.setattr(exporter, "trace_profile", lambda s, o: traced.append(trace_profile(s, o)) or traced[-1])
    out = tmp_path / "ov"
    export_pipeline("tiny", out, backend="openvino", components=["unet", "vae_decoder"])
    assert traced and all(p.height == p.width == 32 for p in traced)  # twice tiny's size multiple of 16
    report = check_parity("tiny", out, settings=FAST)
    assert report.passed, report.failures()
    assert max(o.metrics.max_abs for c in report.components for o in c.outputs) <= 1e-4
    pipe = load_pipeline(out)
    image = pipe("a cat", num_inference_steps=2, height=96, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 96, 64, 3) and np.isfinite(image).all()
    from diffship.exporters.base import ExportOptions
    from diffship.reference.shapes import ShapeProfile

    static = ExportOptions(precision="fp32", profile=ShapeProfile(height=64, width=64), static=True)
    unet = next(s for s in specs_for_pipeline(load("tiny")) if s.name == "unet")
    assert trace_profile(unet, static).height == 64  # a static export is traced at its own size


def test_a_failed_write_is_one_export_error(tmp_path, monkeypatch):
    """OpenVINO reports a full disk as ``RuntimeError: basic_ios::clear``; the export says what failed and where
    (a bench subject then fails alone instead of ending the run as a bug), and leaves nothing behind."""
    import openvino as ov

    def full_disk(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", full_disk)
    with pytest.raises(DiffshipError, match=r"writing vae_decoder into .* failed \(RuntimeError: basic_ios::clear.*"
                                            r"check the free disk space"):
        export_pipeline("tiny", tmp_path / "out", backend="openvino", components=["vae_decoder"])
    assert list(tmp_path.iterdir()) == []

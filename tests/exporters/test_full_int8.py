"""full-int8: the denoiser's convolutions and matrix products in 8 bits (weights and activations), with the
layer groups whose quantization costs the most PSNR measured and kept float; the VAE decoder's too where its
outputs reach the floor; ONNX Runtime QDQ and NNCF."""

from __future__ import annotations

import math

import pytest

from diffship.backends.manifest import read_manifest
from diffship.backends.quantized import GROUPS, MIN_PASSING_DB, kept_groups, normalize_keep_float
from diffship.errors import DiffshipError, OptionError
from diffship.exporters.quantization import MIN_GAIN_DB, QuantNode, choose, group_of, psnr, split_calls
from diffship.parity.compare import ParitySettings, check_parity

FAST = ParitySettings(steps=4, tasks=("text2img",))


def test_layer_groups_come_from_module_paths_and_ops():
    assert group_of(QuantNode("a", "conv", ("conv_in",))) == "ends"
    assert group_of(QuantNode("b", "matmul", ("proj_out",))) == "ends"  # a transformer's last layer
    # an attention block's proj_out is not the model's last layer
    assert group_of(QuantNode("c", "conv", ("up_blocks", "1", "attentions", "0", "proj_out"))) is None
    assert group_of(QuantNode("d", "matmul", ("down_blocks", "0", "resnets", "0", "time_emb_proj"))) == "time-embedding"
    assert group_of(QuantNode("e", "scores", ("mid_block", "attentions", "0", "attn1"))) == "attention-scores"
    assert group_of(QuantNode("f", "matmul", ("mid_block", "attentions", "0", "attn1", "to_q"))) is None
    # the VAE decoder's layers sit below its `decoder` module; post_quant_conv comes first
    assert group_of(QuantNode("g", "conv", ("decoder", "conv_in"))) == "ends"
    assert group_of(QuantNode("h", "conv", ("post_quant_conv",))) == "ends"
    assert group_of(QuantNode("i", "conv", ("decoder", "up_blocks", "0", "resnets", "0", "conv1"))) is None


def test_keep_float_option_is_checked_and_normalized():
    assert normalize_keep_float("attention-scores, ends") == "ends,attention-scores"
    assert normalize_keep_float(["time-embedding"]) == "time-embedding"
    assert kept_groups("auto") is None and kept_groups("none") == () and kept_groups("ends") == ("ends",)
    assert normalize_keep_float("vae-decoder,ends") == "ends,vae-decoder"
    with pytest.raises(OptionError, match="unknown keep_float group.*first-layer.*choose auto, none"):
        normalize_keep_float("first-layer")


def test_groups_are_kept_float_only_where_measured_to_gain():
    nodes = [QuantNode("in", "conv", ("conv_in",)), QuantNode("t", "matmul", ("time_embedding", "linear_1")),
             QuantNode("s", "scores", ("mid_block",)), QuantNode("x", "conv", ("mid_block",))]
    gain = {"in": 4.0, "t": MIN_GAIN_DB / 2, "s": 0.0}
    calls = []

    def score(names):
        calls.append(set(names))
        return 30.0 + sum(gain[n] for n in names)

    choice, names = choose(nodes, None, score)
    assert choice.kept == ("ends",) and names == {"in"}
    assert choice.scores == {"all quantized": 30.0, "ends": 34.0, "time-embedding": 30.5, "attention-scores": 30.0}
    assert calls[0] == set() and len(calls) == 4  # once all quantized, once per group
    assert "kept float: ends" in choice.describe()
    # asked for by name: nothing is measured
    calls.clear()
    choice, names = choose(nodes, ("time-embedding", "attention-scores"), score)
    assert choice.kept == ("time-embedding", "attention-scores") and names == {"t", "s"} and not calls


def test_a_floor_leaves_a_component_float_where_its_choice_falls_under_it():
    nodes = [QuantNode("in", "conv", ("decoder", "conv_in")), QuantNode("s", "scores", ("decoder", "mid_block")),
             QuantNode("x", "conv", ("decoder", "mid_block"))]
    gain = {"in": 3.0, "s": 2.0}
    calls = []

    def score(names):
        calls.append(set(names))
        return 38.0 + sum(gain[n] for n in names)

    # both groups gain: the pair is measured once more, and reaches 43 dB
    choice, names = choose(nodes, None, score, floor=MIN_PASSING_DB)
    assert choice.kept == ("ends", "attention-scores") and names == {"in", "s"}
    assert calls[-1] == {"in", "s"} and len(calls) == 4 and choice.reached == 43.0 and choice.passed
    gain["s"] = 0.0  # only ends gains: its own measurement decides, 41 dB
    choice, _ = choose(nodes, None, score, floor=MIN_PASSING_DB)
    assert choice.kept == ("ends",) and choice.reached == 41.0 and choice.passed
    choice, _ = choose(nodes, None, score, floor=45.0)
    assert not choice.passed and "reached 41.0 dB against the float graph's on a held-out call, under the 45 dB floor" in choice.refusal()
    assert choice.describe().startswith(choice.refusal())
    # asked for by name, or without a floor (the denoiser): always passes
    assert choose(nodes, ("ends",), score, floor=99.0)[0].passed and choose(nodes, None, score)[0].passed


def test_scored_calls_are_held_out_of_calibration():
    calls = [{"i": i} for i in range(10)]
    calibrate, scored = split_calls(calls)
    assert scored == [calls[3], calls[7]] and calibrate == [c for c in calls if c not in scored]
    assert split_calls(calls[:1]) == (calls[:1], calls[:1])
    calibrate, scored = split_calls([{"i": i} for i in range(44)])
    assert len(scored) == 8 and 8 <= len(calibrate) <= 16 and calibrate[0]["i"] == 0 and calibrate[-1]["i"] > 36
    assert psnr([[0.0, 1.0]], [[0.0, 1.0]]) == float("inf")
    assert psnr([[0.0, 1.0]], [[0.0, float("nan")]]) == float("-inf")  # never a good score
    # an image's PSNR: clipped to its range, which is the peak (a toy decoder's outputs span [-4, 4])
    assert psnr([[-4.0, 4.0, 0.0, 0.5]], [[-3.0, 3.0, 0.0, 0.6]]) == pytest.approx(10 * math.log10(64 / 0.5025), 1e-9)
    assert psnr([[-4.0, 4.0, 0.0, 0.5]], [[-3.0, 3.0, 0.0, 0.6]], (-1.0, 1.0)) == pytest.approx(10 * math.log10(4 / 0.0025), 1e-9)


def test_onnx_calibrates_at_a_bounded_size_unless_told():
    """ONNX Runtime's calibrator holds every quantized op's inputs of a call: its runs are capped at 256 a side."""
    from diffship.backends import get
    from diffship.reference.shapes import ShapeProfile
    from diffship.workflows.export import _calibration_size

    side = get("onnx").calibration_side
    assert side == 256 and get("openvino").calibration_side is None
    assert _calibration_size(ShapeProfile(height=512, width=768), side, 8) == (168, 256)
    assert _calibration_size(ShapeProfile(height=64, width=64), side, 8) == (64, 64)
    assert _calibration_size(ShapeProfile(height=1024, width=1024), None, 16) == (1024, 1024)


def test_onnx_precise_nodes_stay_float():
    """A product feeding a sine (Flux's rotary angles: positions x frequencies) is never quantized."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from diffship.exporters.onnx_quantize import precise_nodes, quant_nodes

    freqs = helper.make_tensor("freqs", TensorProto.FLOAT, [1, 4], [1.0, 2.0, 3.0, 4.0])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.5] * 16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pos", "freqs"], ["angles"], name="rope"),
         helper.make_node("Sin", ["angles"], ["sin"], name="sin"),
         helper.make_node("MatMul", ["sin", "w"], ["y"], name="proj")],
        "g", [helper.make_tensor_value_info("pos", TensorProto.FLOAT, [3, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], [freqs, w])
    model = helper.make_model(graph)
    assert precise_nodes(model) == {"rope", "sin"}
    assert [(n.name, n.op) for n in quant_nodes(model)] == [("rope", "matmul"), ("proj", "matmul")]


@pytest.mark.onnx
def test_onnx_full_int8_quantizes_the_unet_and_passes_its_tolerances(export_dir):
    pytest.importorskip("onnxruntime")
    import onnx

    out = export_dir("onnx", "full-int8")
    m = read_manifest(out)
    unet = m.components["unet"]
    assert m.precision == "full-int8" and unet.precision == "full-int8"
    assert m.components["text_encoder"].precision == "fp32"  # the denoiser and the decoder are quantized
    assert m.components["vae_encoder"].precision == "fp32"
    scores = unet.details.quantized_psnr
    assert set(scores) == {"all quantized", *GROUPS}
    assert set(unet.details.kept_float) == {g for g in GROUPS if scores[g] - scores["all quantized"] >= MIN_GAIN_DB}
    ops = [n.op_type for n in onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 20
    # the VAE decoder passed its floor (tiny: ~45 dB) despite force_upcast, which guards fp16 only
    decoder = m.components["vae_decoder"]
    assert decoder.precision == "full-int8" and decoder.details.fp32_fallback is None
    assert set(decoder.details.quantized_psnr) == {"all quantized", "ends", "attention-scores"}
    assert decoder.details.float_activations is None
    ops = [n.op_type for n in onnx.load(str(out / "vae_decoder" / "model.onnx")).graph.node]
    assert ops.count("QuantizeLinear") > 5
    report = check_parity("tiny", out, settings=FAST)
    assert report.precision == "full-int8" and report.passed, report.failures()


@pytest.mark.onnx
def test_onnx_full_int8_keeps_the_groups_asked_for(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from diffship.workflows import export_pipeline

    m = export_pipeline("tiny", tmp_path / "q", backend="onnx", precision="full-int8", components=["unet"],
                        backend_options={"keep_float": "ends"})
    details = m.components["unet"].details
    assert details.kept_float == ["ends"] and details.quantized_psnr is None  # asked: not measured
    graph = onnx.load(str(tmp_path / "q" / "unet" / "model.onnx"), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    for conv in (convs[0], convs[-1]):  # conv_in, conv_out: neither input nor weight is dequantized int8
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in conv.input)
    assert any(producers.get(c.input[0]) is not None and producers[c.input[0]].op_type == "DequantizeLinear"
               for c in convs[1:-1])
    with pytest.raises(DiffshipError, match="unknown keep_float group"):
        export_pipeline("tiny", tmp_path / "bad", backend="onnx", precision="full-int8",
                        backend_options={"keep_float": "everything"})


@pytest.mark.onnx
def test_onnx_full_int8_leaves_the_decoder_float_under_its_floor_or_when_asked(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnx

    from diffship.workflows import export_pipeline

    def quantize_ops(folder):
        return [n.op_type for n in onnx.load(str(folder / "vae_decoder" / "model.onnx")).graph.node
                if n.op_type == "QuantizeLinear"]

    monkeypatch.setattr("diffship.backends.quantized.MIN_PASSING_DB", 200.0)  # no quantization reaches it
    m = export_pipeline("tiny", tmp_path / "floor", backend="onnx", precision="full-int8", components=["vae_decoder"])
    decoder = m.components["vae_decoder"]
    assert decoder.precision == "fp32" and not quantize_ops(tmp_path / "floor")
    assert "under the 200 dB floor" in decoder.details.float_activations and decoder.details.quantized_psnr
    assert decoder.details.kept_float is None
    def no_runs(*args, **kwargs):
        raise AssertionError("calibration runs for a component that takes no calibration")

    monkeypatch.setattr("diffship.reference.recording.calibration_inputs", no_runs)
    m = export_pipeline("tiny", tmp_path / "kept", backend="onnx", precision="full-int8", components=["vae_decoder"],
                        backend_options={"keep_float": "vae-decoder"})
    decoder = m.components["vae_decoder"]
    assert decoder.precision == "fp32" and decoder.details.quantized_psnr is None and not quantize_ops(tmp_path / "kept")


@pytest.mark.openvino
def test_openvino_full_int8_quantizes_the_unet_and_passes_its_tolerances(export_dir):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    out = export_dir("openvino", "full-int8")
    m = read_manifest(out)
    unet = m.components["unet"]
    assert unet.precision == "full-int8" and unet.details.weights == "int8"
    assert unet.details.activations.startswith("int8 on convolutions and matrix products, calibrated on 44")
    assert m.components["text_encoder"].details.activations is None  # 8-bit weights only
    scores = unet.details.quantized_psnr
    assert set(scores) == {"all quantized", *GROUPS}
    assert set(unet.details.kept_float) == {g for g in GROUPS if scores[g] - scores["all quantized"] >= MIN_GAIN_DB}
    xml = (out / "unet" / "openvino_model.xml").read_text()
    assert xml.count('type="FakeQuantize"') > 20
    decoder = m.components["vae_decoder"]  # passed its floor: one calibration call per prompt
    assert decoder.details.activations.startswith("int8 on convolutions and matrix products, calibrated on 4 ")
    assert (out / "vae_decoder" / "openvino_model.xml").read_text().count('type="FakeQuantize"') > 5
    report = check_parity("tiny", out, settings=FAST)
    assert report.precision == "full-int8" and report.passed, report.failures()

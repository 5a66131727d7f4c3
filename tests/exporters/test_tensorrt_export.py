"""TensorRT engines built here, without a GPU (TensorRT-RTX builds ahead of time on the CPU).

What runs here is the whole build path: ONNX step and its cache, parsing, optimization profiles
(presets, explicit and several), precisions (fp32, fp16 with fp32 fallbacks, bf16), builder options
and the engine naming and manifest record. Running the engines needs an NVIDIA GPU: see
tests/runtimes/test_tensorrt_runtime.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.tensorrt
if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
    pytest.skip("neither tensorrt nor tensorrt_rtx is installed (the tensorrt extra)", allow_module_level=True)

from diffship.backends.manifest import read_manifest  # noqa: E402
from diffship.backends.tensorrt import TENSORRT  # noqa: E402
from diffship.configs.fields import to_data  # noqa: E402
from diffship.errors import ExportError, OptionError, ShapeError, UnavailableRuntimeError  # noqa: E402
from diffship.exporters import ExportOptions  # noqa: E402
from diffship.exporters.tensorrt import resolve_profiles  # noqa: E402
from diffship.reference.pipelines import specs_for_pipeline  # noqa: E402
from diffship.reference.shapes import ShapeProfile, ShapeRange  # noqa: E402
from diffship.workflows import export_pipeline  # noqa: E402

COMPONENTS = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
TINY = ShapeProfile(batch_size=1, height=64, width=64)  # tiny's default request; its UNet takes multiples of 16 px
RTX = importlib.util.find_spec("tensorrt") is None  # when both are installed, standard TensorRT builds
CAN_RUN = torch.cuda.is_available()


def engine_details(out, name):
    return read_manifest(out).components[name].details


def test_builds_an_engine_per_component_with_the_manifest_record(export_dir, tiny_pipe):
    out = export_dir("tensorrt")
    m = read_manifest(out)
    flavour = "tensorrt_rtx" if RTX else "tensorrt"
    assert m.backend == "tensorrt" and flavour in m.versions
    specs = {s.name: s for s in specs_for_pipeline(tiny_pipe)}
    for name in COMPONENTS:
        d = m.components[name].details
        plan = out / name / d.engine
        assert m.components[name].files == [d.engine] and plan.stat().st_size > 100_000
        assert d.engine.startswith("fp32.b1-4_h32-128_w32-128.") and d.engine.endswith(".plan")
        assert f"-{d.tensorrt_version}." in d.engine and d.flavour == flavour
        assert d.strongly_typed and d.tf32 is False and d.refittable is False
        # The profile TensorRT reports back is the one diffship computed from the request range.
        (profile,) = d.profiles
        assert profile.request.batch == (1, 1, 4) and profile.request.height == (32, 64, 128)
        expected = specs[name].input_ranges(profile.request)
        assert to_data(profile.inputs) == {n: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                                           for n, (lo, opt, hi) in expected.items()}
    unet = to_data(m.components["unet"].details.profiles[0].inputs)
    # Guidance doubling: one image without guidance (1) up to 4 images with it (8).
    assert unet["sample"] == {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}
    text = to_data(m.components["text_encoder"].details.profiles[0].inputs)
    assert text["input_ids"] == {"min": [1, 77], "opt": [1, 77], "max": [4, 77]}
    if flavour == "tensorrt_rtx":
        assert engine_details(out, "unet").compute_capability["targets"] == "portable"
        assert "not used" in engine_details(out, "unet").timing_cache["note"]


def test_static_profile_and_builder_options(export_dir):
    options = {"optimization_level": 1, **({"compute_capability": "sm86,sm89"} if RTX else {}),
               **({"refit": True} if CAN_RUN or not RTX else {})}
    out = export_dir("tensorrt", static=(64, 64), batch_size=2, backend_options=options,
                     components=["text_encoder", "unet"])
    m = read_manifest(out)
    unet = m.components["unet"].details
    assert to_data(unet.profiles[0].inputs["sample"]) == {"min": [4, 4, 8, 8], "opt": [4, 4, 8, 8],
                                                          "max": [4, 4, 8, 8]}
    assert unet.refittable is options.get("refit", False) and unet.optimization_level == 1
    assert ".b2_h64_w64." in unet.engine
    # The text encoder keeps a dynamic batch even in a static export (one call per prompt list).
    assert m.components["text_encoder"].details.profiles[0].inputs["input_ids"].max == [2, 77]
    if RTX:
        assert unet.compute_capability["targets"] == ["sm86", "sm89"] and unet.engine.endswith(".sm86-sm89.plan")


@pytest.mark.skipif(not RTX or CAN_RUN, reason="shows a TensorRT-RTX limitation of hosts without a GPU")
def test_refit_without_a_gpu_says_what_to_do(tmp_path):
    with pytest.raises(ExportError, match="TensorRT-RTX builds refittable engines only where a GPU is"):
        export_pipeline("tiny", tmp_path / "out", backend="tensorrt", components=["vae_decoder"],
                        backend_options={"refit": True, "profile": "static"})


def test_several_profiles_in_one_engine(tmp_path):
    ranges = [{"batch": 1, "height": 64, "width": 64}, {"batch": [1, 2, 2], "height": [96, 128, 128], "width": 128}]
    m = export_pipeline("tiny", tmp_path / "out", backend="tensorrt", components=["vae_decoder"],
                        backend_options={"profile": ranges})
    d = m.components["vae_decoder"].details
    assert [p.inputs["latent_sample"].max for p in d.profiles] == [[1, 4, 8, 8], [2, 4, 16, 16]]
    assert ".b1_h64_w64+b1-2_h96-128_w128." in d.engine


def test_fp16_engines_keep_the_vae_fp32_and_bf16_builds(export_dir):
    m = read_manifest(export_dir("tensorrt", "fp16", backend_options={"profile": "static"},
                                 components=["unet", "vae_decoder"]))
    assert m.components["unet"].precision == "fp16"
    assert m.components["unet"].inputs[0].dtype == "float16"
    assert m.components["unet"].details.engine.startswith("fp16.")
    dec = m.components["vae_decoder"]
    assert dec.precision == "fp32" and "force_upcast" in dec.details.fp32_fallback
    m = read_manifest(export_dir("tensorrt", "bf16", backend_options={"profile": "static"}, components=["unet"]))
    unet = m.components["unet"]
    assert unet.precision == "bf16" and unet.inputs[0].dtype == "bfloat16"
    assert unet.details.onnx["opset"] == 22  # bfloat16 convolutions need opset 22


def test_fp16_overflow_is_caught_without_a_runtime(tmp_path, hot_vae_source):
    """No GPU here, so the reduced-precision probe runs the fp16 torch module; the decoder falls back."""
    src = hot_vae_source
    m = export_pipeline(src, tmp_path / "out", backend="tensorrt", precision="fp16", components=["vae_decoder"],
                        backend_options={"profile": "static"})
    entry = m.components["vae_decoder"]
    assert entry.precision == "fp32" and entry.details.engine.startswith("fp32.")
    assert "non-finite values in sample at fp16" in entry.details.fp32_fallback


def test_rebuild_reuses_the_onnx_export(tmp_path):
    first = export_pipeline("tiny", tmp_path / "a", backend="tensorrt", components=["unet"])
    again = export_pipeline("tiny", tmp_path / "b", backend="tensorrt", components=["unet"],
                            backend_options={"profile": "static", "optimization_level": 0})
    onnx_first, onnx_again = (m.components["unet"].details.onnx for m in (first, again))
    assert onnx_again["reused"] is True and onnx_again["cached"] == onnx_first["cached"]
    assert "ONNX reused from the cache" in again.components["unet"].details.notes[0]
    off = export_pipeline("tiny", tmp_path / "c", backend="tensorrt", components=["unet"],
                          backend_options={"onnx_cache": False, "profile": "static"})
    assert off.components["unet"].details.onnx["cached"] is None


def _options(**kwargs) -> ExportOptions:
    return ExportOptions(profile=TINY, size_multiple=16, **kwargs)


@pytest.mark.parametrize("value, message", [
    ("huge", r"unknown shape profile 'huge'; choose static, dynamic"),
    ({"height": [64, 32, 128]}, r"profile height \[64, 32, 128\] is not \[min, opt, max\]"),
    ({"width": [40, 64, 64]}, r"40 is not a multiple of 16, the image sizes this model's UNet takes \(e.g. 32\)"),
    ({"batch": [0, 1, 2]}, r"profile batch \[0, 1, 2\] must be at least 1"),
    ({"depth": 3}, r"unknown profile key\(s\) depth; use batch, height, width, text_sequence"),
    ({"text_sequence": [64, 77, 128]}, r"profile text_sequence: this pipeline has no T5 encoder \(its text is CLIP's "
                                       r"77 tokens, fixed\)"),
    ({"height": "big"}, r"profile height must be a whole number or \[min, opt, max\]"),
    (7, r"profile must be a preset name"),
])
def test_bad_profiles_are_refused_before_building(value, message):
    with pytest.raises(ShapeError, match=message):
        resolve_profiles(value, _options())


def test_t5_sequence_ranges_for_pipelines_with_t5():
    """SD3 and Flux: a profile may range over T5 sequence lengths (``max_sequence_length``); each component's
    text dims follow (T5's own, SD3's joint sequence after CLIP's 77 tokens, Flux's text tokens)."""
    from diffship.backends.tensorrt import engine_name
    from diffship.reference import load
    from diffship.reference.families import flux_specs, stable_diffusion_3_specs
    from diffship.reference.pipelines import pipeline_configs

    def preset_configs(name):
        return pipeline_configs(load(name))

    t5 = _options(text_sequence=256)
    (r,) = resolve_profiles({"text_sequence": [32, 128, 512]}, t5)
    assert r.text_sequence == (32, 128, 512) and r.describe().endswith("with 32-512 T5 tokens")
    (default,) = resolve_profiles({"height": [32, 64, 128]}, t5)
    assert default.text_sequence is None  # the pipeline's default only, as before
    for value, message in (([32, 16, 512], r"text_sequence \[32, 16, 512\] is not \[min, opt, max\]"),
                           ([64, 256, 1024], r"take at most 512 T5 tokens")):
        with pytest.raises(ShapeError, match=message):
            resolve_profiles({"text_sequence": value}, t5)
    assert "_t32-512." in engine_name("fp32", [r], "tensorrt_rtx", "1.7", "portable")
    sd3 = {s.name: s for s in stable_diffusion_3_specs(preset_configs("tiny-sd3"))}
    flux = {s.name: s for s in flux_specs(preset_configs("tiny-flux"))}
    assert sd3["text_encoder_3"].default_text_sequence() == 256 and flux["transformer"].default_text_sequence() == 512
    ranges = sd3["transformer"].input_ranges(r)["encoder_hidden_states"]
    assert [shape[1] for shape in ranges] == [77 + 32, 77 + 128, 77 + 512]
    assert [shape[1] for shape in sd3["text_encoder_3"].input_ranges(r)["input_ids"]] == [32, 128, 512]
    assert [shape[0] for shape in flux["transformer"].input_ranges(r)["txt_ids"]] == [32, 128, 512]
    assert sd3["text_encoder"].input_ranges(r)["input_ids"][2][1] == 77  # CLIP's stays fixed


def test_profile_presets_and_static_exports():
    (dynamic,) = resolve_profiles(None, _options())
    assert (dynamic.batch, dynamic.height, dynamic.width) == ((1, 1, 4), (32, 64, 128), (32, 64, 128))
    (fixed,) = resolve_profiles(None, _options(static=True))
    assert fixed == ShapeRange.fixed(TINY) and fixed.is_fixed
    with pytest.raises(ShapeError, match="a --static export takes exactly 1 image"):
        resolve_profiles("dynamic", _options(static=True))


@pytest.mark.parametrize("extra, message", [
    ({"optimisation_level": 2}, r"unknown tensorrt export option\(s\) optimisation_level; it takes: profile"),
    ({"optimization_level": 9}, r"optimization_level must be 0-5"),
    ({"refit": "yes"}, r"refit must be true or false"),
    ({"flavour": "tensorrt_llm"}, r"unknown flavour 'tensorrt_llm'; choose one of: tensorrt, tensorrt_rtx"),
])
def test_bad_build_options(extra, message):
    with pytest.raises(OptionError, match=message):
        TENSORRT.parse_export_options(extra)


def test_bad_compute_capability_is_refused(tmp_path):
    with pytest.raises(ExportError, match="compute_capability sm99 is not valid"):
        export_pipeline("tiny", tmp_path / "out", backend="tensorrt", components=["vae_decoder"],
                        backend_options={"compute_capability": "sm99"})
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(CAN_RUN, reason="this machine has a GPU; the refusal cannot be shown here")
def test_loading_without_a_gpu_says_why(export_dir):
    from diffship.runtimes.pipeline import load_pipeline

    with pytest.raises(UnavailableRuntimeError, match="the tensorrt runtime needs an NVIDIA GPU"):
        load_pipeline(export_dir("tensorrt"))


def test_cli_export_and_inspect_show_profiles_and_times(tmp_path, capsys):
    from diffship.cli import main

    out = tmp_path / "trt"
    assert main(["export", "tiny", str(out), "--backend", "tensorrt", "--component", "unet"]) == 0
    printed = capsys.readouterr().out
    assert "unet: onnx export" in printed and "engine build" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unet profile 0: 1-4 image(s) of 32-128 x 32-128 px" in printed
    assert "(8, 4, 16, 16)" in printed and "optimization_level 3" in printed

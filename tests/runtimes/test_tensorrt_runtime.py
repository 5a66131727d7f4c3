"""TensorRT runtime: engine compatibility and profile choice (pure, run everywhere), and the engines
themselves on an NVIDIA GPU (marked ``gpu``; skipped where there is no GPU or no TensorRT runtime).

The GPU tests are written to run unchanged on a machine with both: they export ``tiny`` here, load
the engines, and check parity, tensors staying on the GPU, profile refusal and CUDA graphs. The
pipeline-interface tests (tests/runtimes/test_pipeline_interface.py) also run against TensorRT there,
through the ``backend`` fixture.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from diffship.backends.tensorrt import TENSORRT, check_engine
from diffship.errors import ExportedModelError, ShapeError
from diffship.runtimes.tensorrt import select_profile

HAS_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))

PROFILES = [
    {"request": {"batch": [1, 1, 1], "height": [64, 64, 64], "width": [64, 64, 64]},
     "inputs": {"sample": {"min": [2, 4, 8, 8], "opt": [2, 4, 8, 8], "max": [2, 4, 8, 8]}}},
    {"request": {"batch": [1, 1, 2], "height": [32, 64, 128], "width": [32, 64, 128]},
     "inputs": {"sample": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 16]}}},
]


def details(**overrides):
    """A TensorRT-RTX engine's manifest record, as read from a manifest."""
    base = {"engine": "fp16.b1-4_h256-1024_w256-1024.trt-rtx-1.7.1.116.portable.plan", "flavour": "tensorrt_rtx",
            "tensorrt_version": "1.7.1.116", "compute_capability": {"targets": "portable"}, "strongly_typed": True,
            "tf32": False, "profiles": PROFILES, "optimization_level": 3, "refittable": False, "timing_cache": {},
            "onnx": {}, "timings": {}, "notes": []}
    return TENSORRT.parse_details({**base, **overrides}, "test")


PROFILES = details().profiles


def test_the_first_profile_that_holds_the_shapes_is_chosen():
    assert select_profile(PROFILES, {"sample": (2, 4, 8, 8)}, "unet") == 0
    assert select_profile(PROFILES, {"sample": (1, 4, 8, 8)}, "unet") == 1
    assert select_profile(PROFILES, {"sample": (4, 4, 16, 12)}, "unet") == 1


def test_a_shape_outside_every_profile_is_refused_with_the_sizes_taken():
    with pytest.raises(ShapeError) as info:
        select_profile(PROFILES, {"sample": (2, 4, 20, 20)}, "unet")
    message = str(info.value)
    assert message.startswith("unet: sample (2, 4, 20, 20) is outside the engine's optimization profiles, which take")
    assert "1 image(s) of 64 x 64 px" in message and "1-2 image(s) of 32-128 x 32-128 px" in message
    assert "sample (1, 4, 4, 4)..(4, 4, 16, 16)" in message and "re-export with -o profile=" in message


@pytest.mark.parametrize("installed, capability, message", [
    ({}, (8, 9), r"was built with TensorRT-RTX 1.7.1.116, but this machine has no TensorRT; install"),
    ({"tensorrt": "10.13.0"}, (8, 9), r"but this machine has TensorRT 10.13.0"),
    ({"tensorrt_rtx": "1.8.0.10"}, (8, 9), r"TensorRT-RTX 1.8.0.10 is installed \(engines load only in the version"),
    ({"tensorrt_rtx": "1.7.1.116"}, (7, 5), r"targets portable \(sm80, sm86, sm89, sm120, sm121\), but this GPU is sm75"),
    # Hopper and data-center Blackwell pass "sm80 and later" but TensorRT-RTX does not run there.
    ({"tensorrt_rtx": "1.7.1.116"}, (9, 0), r"TensorRT-RTX does not run on this GPU \(sm90; .*use standard TensorRT"),
    ({"tensorrt_rtx": "1.7.1.116"}, (10, 0), r"TensorRT-RTX does not run on this GPU \(sm100; .*-o flavour=tensorrt"),
])
def test_mismatched_engines_are_refused_before_loading(installed, capability, message):
    with pytest.raises(ExportedModelError, match=message):
        check_engine(details(), installed, capability)


def test_standard_tensorrt_runs_hardware_compatible_engines_on_hopper():
    hopper = details(flavour="tensorrt", tensorrt_version="10.13.0", compute_capability={"targets": "ampere+"})
    check_engine(hopper, {"tensorrt": "10.13.0"}, (9, 0))


def test_cuda_graphs_are_captured_only_where_they_replay_correctly():
    from diffship.runtimes.tensorrt import graph_capture_problem

    fixed, ranged = PROFILES
    assert graph_capture_problem(False, fixed) is None
    assert "takes a range of shapes" in graph_capture_problem(False, ranged)
    assert "captures its own graphs" in graph_capture_problem(True, fixed)


def test_each_component_keeps_its_own_runtime_cache(tmp_path):
    from diffship.errors import OptionError
    from diffship.runtimes.tensorrt import runtime_cache_file

    unet = runtime_cache_file(tmp_path, "unet", "fp16.b1_h64_w64.trt-rtx-1.7.1.116.portable.plan")
    vae = runtime_cache_file(tmp_path, "vae_decoder", "fp16.b1_h64_w64.trt-rtx-1.7.1.116.portable.plan")
    assert unet.parent == vae.parent == tmp_path and unet != vae
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OptionError, match="runtime_cache names a folder"):
        runtime_cache_file(tmp_path / "a-file", "unet", "x.plan")


def test_named_targets_are_checked():
    named = details(compute_capability={"targets": ["sm86", "sm89"]})
    check_engine(named, {"tensorrt_rtx": "1.7.1.116"}, (8, 9))
    with pytest.raises(ExportedModelError, match=r"targets sm86, sm89, but this GPU is sm120; .*compute_capability=sm120"):
        check_engine(named, {"tensorrt_rtx": "1.7.1.116"}, (12, 0))
    check_engine(details(), {"tensorrt_rtx": "1.7.1.116"}, (12, 0))  # portable covers newer GPUs


# --- on an NVIDIA GPU ---------------------------------------------------------------------------------

_LACKS = [what for what, ok in (("an NVIDIA GPU", torch.cuda.is_available()),
                                 ("a TensorRT runtime (tensorrt or tensorrt_rtx)", HAS_TRT)) if not ok]
gpu = pytest.mark.skipif(bool(_LACKS), reason=f"runs TensorRT engines: this machine lacks {' and '.join(_LACKS)}")


@pytest.mark.gpu
@pytest.mark.tensorrt
@gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_pass_parity(export_dir, precision):
    from diffship.parity.compare import ParitySettings, check_parity

    report = check_parity("tiny", export_dir("tensorrt", precision), settings=ParitySettings(steps=4))
    assert report.passed, report.failures()
    assert "TensorRT" in report.evaluator


@pytest.mark.gpu
@pytest.mark.tensorrt
@gpu
def test_tensors_stay_on_the_gpu(export_dir):
    from diffship.runtimes.pipeline import open_export

    loaded = open_export(export_dir("tensorrt"))
    pipe = loaded.pipeline
    assert pipe.device.type == "cuda" and pipe.unet.device.type == "cuda"
    seen = []
    pipe(prompt="a cat", num_inference_steps=2, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].device.type) or kw)
    assert seen == ["cuda", "cuda"]
    out = loaded.runners["unet"].infer({"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([1.0, 1.0]),
                                        "encoder_hidden_states": torch.randn(2, 77, 32)})
    assert out["out_sample"].device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.tensorrt
@gpu
def test_a_size_outside_the_profile_is_refused_at_call_time(export_dir):
    from diffship.runtimes.pipeline import load_pipeline

    pipe = load_pipeline(export_dir("tensorrt"))  # dynamic preset: 32-128 px
    with pytest.raises(ShapeError, match=r"outside the engine's optimization profiles, which take 1-4 image\(s\) of "
                                         r"32-128 x 32-128 px"):
        pipe(prompt="a cat", num_inference_steps=1, height=256, width=256)


@pytest.mark.gpu
@pytest.mark.tensorrt
@gpu
def test_cuda_graphs_replay_the_same_results(export_dir):
    from diffship.backends.manifest import read_manifest
    from diffship.runtimes import open_runner

    out = export_dir("tensorrt", static=(64, 64))
    entry = read_manifest(out).components["unet"]
    plain = open_runner("tensorrt", out / "unet", entry)
    graphed = open_runner("tensorrt", out / "unet", entry, cuda_graph=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # capture on first use, then replays with new inputs
        feeds = {"sample": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([10.0, 10.0]),
                 "encoder_hidden_states": torch.randn(2, 77, 32, generator=gen)}
        torch.testing.assert_close(graphed.infer(feeds)["out_sample"], plain.infer(feeds)["out_sample"])


@pytest.mark.gpu
@pytest.mark.tensorrt
@gpu
def test_several_profiles_and_shape_switches_match_eager(export_dir, tiny_pipe):
    """Two profiles (a fixed 64x64 one and a 32-128 px range); calls switch between them and between
    shapes within the range, with and without CUDA graphs, and each image matches eager PyTorch."""
    from diffship.configs import load_tolerances
    from diffship.parity.metrics import image_metrics
    from diffship.runtimes.pipeline import open_export

    profiles = [{"batch": [1, 1, 1], "height": [64, 64, 64], "width": [64, 64, 64]},
                {"batch": [1, 1, 2], "height": [32, 64, 128], "width": [32, 64, 128]}]
    out = export_dir("tensorrt", backend_options={"profile": profiles})
    limit = load_tolerances("tensorrt", "fp32").image.psnr_min
    tiny_pipe.set_progress_bar_config(disable=True)
    for graphs in (False, True):
        with open_export(out, cuda_graph=graphs) as loaded:
            for height, width in ((64, 64), (96, 128), (64, 64), (32, 64), (96, 128)):
                request = dict(prompt="a cat", num_inference_steps=2, height=height, width=width, output_type="np")
                got = loaded.pipeline(**request, generator=torch.Generator().manual_seed(0)).images
                want = tiny_pipe(**request, generator=torch.Generator().manual_seed(0)).images
                assert image_metrics(want[0], got[0]).psnr >= limit, (graphs, height, width)


@pytest.mark.gpu
@pytest.mark.tensorrt
@gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="runtime caches are TensorRT-RTX's")
def test_runtime_caches_are_saved_per_component_on_close(export_dir, tmp_path):
    from diffship.runtimes.pipeline import open_export

    cache = tmp_path / "rt-cache"
    with open_export(export_dir("tensorrt"), runtime_cache=str(cache)) as loaded:
        loaded.pipeline(prompt="a cat", num_inference_steps=1, output_type="latent")
        assert not cache.exists() or not any(cache.iterdir())  # saved when the runners close, not before
    files = sorted(p.name.split(".")[0] for p in cache.glob("*.rtcache"))
    assert files == sorted(loaded.runners)  # one file per component: none overwrote another
    with open_export(export_dir("tensorrt"), runtime_cache=str(cache)) as again:  # loads them back
        again.pipeline(prompt="a cat", num_inference_steps=1, output_type="latent")

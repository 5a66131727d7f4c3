"""Core ML: ML Program exports checked on Linux through the MIL reference evaluator.

Parity here runs the saved programs with torch kernels (tests/runtimes/test_mil_reference.py checks
the evaluator op by op); on macOS the same checks run through Core ML itself
(tests/runtimes/test_coreml_runtime.py). Core ML exports have fixed shapes, so the dynamic-shape
pipeline-interface tests do not take them; the interface is exercised here at the export's size.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.coreml
ct = pytest.importorskip("coremltools", reason="the coreml extra is not installed")

from diffship.errors import OptionError, ShapeError, UnavailableRuntimeError  # noqa: E402
from diffship.workflows import export_pipeline  # noqa: E402
from diffship.backends.manifest import read_manifest  # noqa: E402
from diffship.parity.compare import ParitySettings, check_parity  # noqa: E402
from diffship.reference.attention import SplitEinsumAttnProcessor, with_attention  # noqa: E402
from diffship.reference.pipelines import specs_for_pipeline  # noqa: E402
from diffship.reference.shapes import ShapeProfile  # noqa: E402
from diffship.runtimes.pipeline import load_pipeline  # noqa: E402

COMPONENTS = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
FAST = ParitySettings(steps=4, tasks=("text2img",))
#: the components with attention, which split_einsum changes (the text encoder's stays as it is)
SPLIT_EINSUM = ["unet", "vae_decoder"]
EVALUATOR = "Core ML runtime" if platform.system() == "Darwin" else f"MIL reference ({platform.system()})"


def passing(out, settings=None):
    """Run parity, require it to pass; (worst component PSNR, worst max abs, worst image PSNR), report."""
    report = check_parity("tiny", out, settings=settings)
    assert report.passed, report.failures()
    outputs = [o for c in report.components for o in c.outputs]
    return (min(o.metrics.psnr for o in outputs), max(o.metrics.max_abs for o in outputs),
            min(i.metrics.psnr for i in report.images)), report


def test_layout_manifest_and_metadata(export_dir):
    out = export_dir("coreml")
    m = read_manifest(out)
    assert m.backend == "coreml" and "coremltools" in m.versions
    for name in COMPONENTS:
        entry = m.components[name]
        assert (out / name / "model.mlpackage" / "Manifest.json").is_file()
        assert entry.details.attention == "original" and entry.details.deployment_target == "macOS13"
        assert entry.details.sizes == [[64, 64]]
    unet = m.components["unet"]
    # Fixed shapes at the export's size; the model takes the text embeddings as (B, D, 1, S), like Apple's.
    assert unet.inputs[0].dims == [2, 4, 8, 8]
    hidden = next(i for i in unet.details.model_inputs if i.name == "encoder_hidden_states")
    assert hidden.layout == "bc1s" and hidden.shapes == [[2, 32, 1, 77]]
    assert m.components["text_encoder"].details.model_inputs[0].dtype == "float32"
    spec = ct.utils.load_spec(str(out / "unet" / "model.mlpackage"))
    meta = spec.description.metadata
    assert meta.author == "diffship" and meta.versionString == m.source.fingerprint[:12]
    assert meta.userDefined["source_fingerprint"] == m.source.fingerprint
    assert meta.userDefined["diffship_version"] == m.versions["diffship"] and "tiny" in meta.shortDescription
    assert [i.name for i in spec.description.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert all(i.shortDescription for i in spec.description.input)
    assert list(spec.description.input[2].type.multiArrayType.shape) == [2, 32, 1, 77]


def test_fp32_parity_through_the_reference_evaluator(export_dir):
    (component_psnr, max_abs, image_psnr), report = passing(export_dir("coreml"))
    assert report.evaluator.startswith(EVALUATOR)
    assert image_psnr >= 40 and component_psnr >= 35 and max_abs <= 1e-4
    assert {i.label.split("[")[0] for i in report.images} == {"text2img", "img2img", "inpaint"}


def test_fp16_parity_meets_apples_gate(export_dir):
    out = export_dir("coreml", "fp16")
    m = read_manifest(out)
    assert m.components["unet"].details.compute_precision == "fp16"
    assert "cast" in m.components["unet"].details.mil_ops
    assert "force_upcast" in m.components["vae_decoder"].details.fp32_fallback
    (component_psnr, max_abs, image_psnr), _ = passing(out, FAST)
    assert image_psnr >= 30 and component_psnr >= 35
    assert max_abs > 1e-5  # it really computed in fp16


def _sd2_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=32,
    ).eval()


@pytest.mark.parametrize("name", ["unet", "sd2_unet", "vae_encoder", "vae_decoder"])
def test_split_einsum_equals_original_in_torch(tiny_pipe, name):
    specs = {s.name: s for s in specs_for_pipeline(tiny_pipe)}
    spec = specs["unet" if name == "sd2_unet" else name]
    eager = _sd2_unet() if name == "sd2_unet" else getattr(tiny_pipe, spec.source)
    original = spec.wrapper(eager).eval()
    variant = with_attention(original, "split_einsum")
    processors = [m.processor for m in variant.modules() if hasattr(m, "processor")]
    assert processors and all(isinstance(p, SplitEinsumAttnProcessor) for p in processors)
    assert not any(isinstance(getattr(m, "processor", None), SplitEinsumAttnProcessor) for m in eager.modules())
    for seed in range(2):
        inputs = spec.example_inputs(ShapeProfile(height=64, width=96), seed=seed)
        with torch.no_grad():
            a, b = original(*inputs.values()), variant(*inputs.values())
        assert float(a.abs().max()) > 0.1
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_split_einsum_passes_parity(export_dir):
    out = export_dir("coreml", backend_options={"attention": "split_einsum"}, components=SPLIT_EINSUM)
    m = read_manifest(out)
    assert "einsum" in m.components["unet"].details.mil_ops
    assert "einsum" in m.components["vae_decoder"].details.mil_ops
    (component_psnr, _, image_psnr), _ = passing(out, FAST)
    assert image_psnr >= 40 and component_psnr >= 35


@pytest.mark.parametrize("precision, op, bits", [("palette4", "constexpr_lut_to_dense", 4),
                                                  ("palette8", "constexpr_lut_to_dense", 8),
                                                  ("int8", "constexpr_affine_dequantize", 8)])
def test_weight_formats_pass_their_measured_tolerances(export_dir, precision, op, bits):
    out = export_dir("coreml", precision, components=["text_encoder", "unet"])
    m = read_manifest(out)
    unet = m.components["unet"]
    assert unet.details.weights == precision and op in unet.details.mil_ops
    weights = sum(p.stat().st_size for p in (out / "unet" / "model.mlpackage").rglob("weight.bin"))
    fp32 = sum(p.stat().st_size for p in (export_dir("coreml") / "unet" / "model.mlpackage").rglob("weight.bin"))
    assert weights < fp32 * (bits / 32 + 0.1)
    _, report = passing(out, FAST)
    assert report.precision == precision


def test_enumerated_sizes_run_each_size_and_refuse_others(export_dir, tiny_pipe):
    out = export_dir("coreml", components=["unet", "vae_decoder"], backend_options={"sizes": "96x64,128x128"})
    m = read_manifest(out)
    assert m.components["unet"].details.sizes == [[64, 64], [96, 64], [128, 128]]
    assert m.components["unet"].inputs[0].dims == [2, 4, "latent_height", "latent_width"]
    for height, width in ((96, 64), (128, 128)):
        (_, _, image_psnr), _ = passing(out, ParitySettings(steps=3, tasks=("text2img",), height=height, width=width))
        assert image_psnr >= 40
    pipe = load_pipeline(out)
    with pytest.raises(ShapeError, match=r"takes \(2, 4, 8, 8\) or \(2, 4, 12, 8\) or \(2, 4, 16, 16\) -- Core ML "
                                         r"exports take fixed sizes: 64x64, 96x64, 128x128 px"):
        pipe("a cat", num_inference_steps=1, height=64, width=128)


def test_mixed_bit_grouped_palettes_keep_their_target_on_ios18(export_dir, tiny_pipe):
    """palette-mixed with per-grouped-channel palettes (iOS 18; which also fuses attention): every UNet
    weight above the threshold found in the program, widths mixed, the target kept through the program."""
    from diffship.exporters.palettes import covered

    # the UNet alone: its search is what the assertions judge (the text encoder's runs the same code, and
    # this was the suite's slowest test)
    out = export_dir("coreml", "palette-mixed", components=["unet"],
                     backend_options={"palette_granularity": "per_grouped_channel", "deployment_target": "iOS18"})
    unet = read_manifest(out).components["unet"].details
    assert "scaled_dot_product_attention" in unet.mil_ops and "constexpr_lut_to_dense" in unet.mil_ops
    mixed = unet.mixed_bits
    assert unet.palette_group_size == 16 and mixed.target_psnr == 40.0
    assert mixed.psnr >= 40.0 and mixed.samples == 4  # four recorded UNet calls, not examples
    spec = {s.name: s for s in specs_for_pipeline(tiny_pipe)}["unet"]
    assert len(mixed.bits) == len(covered(spec.wrapper(tiny_pipe.unet)))
    assert len(set(mixed.bits.values())) > 1 and set(mixed.bits.values()) <= {2, 4, 6, 8, 16}
    assert mixed.average_bits < 6
    (component_psnr, _, _), report = passing(out, FAST)
    assert component_psnr >= 35 and report.precision == "palette-mixed"


def test_pipelines_run_at_the_export_size_and_refuse_others(export_dir, tiny_pipe):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

    pipe = load_pipeline(export_dir("coreml"))
    for p in (pipe, tiny_pipe):
        p.set_progress_bar_config(disable=True)
    eager = type(tiny_pipe)(**tiny_pipe.components, requires_safety_checker=False)
    for p in (pipe, eager):
        p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
    kwargs = dict(prompt="a cat", num_inference_steps=3, output_type="np")
    got = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    want = eager(**kwargs, generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(got, want, atol=1e-4)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    out = img2img(prompt="a cat", image=got, strength=0.5, num_inference_steps=3, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
    with pytest.raises(ShapeError, match=r"Core ML exports take fixed sizes: 64x64 px; re-export with this size"):
        pipe(prompt="a cat", num_inference_steps=1, height=96, width=64)


@pytest.mark.parametrize("options, message", [
    ({"attention": "flash"}, r"unknown attention 'flash'; choose one of: original, split_einsum"),
    ({"deployment_target": "iOS12"}, r"unknown deployment_target 'iOS12'; choose one of: macOS13"),
    ({"sizes": "64by64"}, r"sizes: '64by64' is not HEIGHTxWIDTH"),
    ({"compute_units": "all"}, r"unknown coreml export option\(s\) compute_units; it takes: attention"),
])
def test_bad_options_are_refused(tmp_path, options, message):
    with pytest.raises(OptionError, match=message):
        export_pipeline("tiny", tmp_path / "out", backend="coreml", components=["vae_decoder"], backend_options=options)
    assert not (tmp_path / "out").exists()


def test_sizes_the_unet_cannot_take_are_refused(tmp_path):
    with pytest.raises(ShapeError, match="height 72 is not a positive multiple of 16"):
        export_pipeline("tiny", tmp_path / "out", backend="coreml", components=["vae_decoder"],
                        backend_options={"sizes": "72x64"})


@pytest.mark.skipif(platform.system() == "Darwin", reason="shows the refusal where Core ML itself is missing")
def test_the_core_ml_runtime_is_refused_off_macos(export_dir):
    with pytest.raises(UnavailableRuntimeError, match=r"MLModel.predict\) exists only on macOS, not on Linux; use "
                                                      r"evaluator=mil"):
        load_pipeline(export_dir("coreml"), evaluator="coreml")

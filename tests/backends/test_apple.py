"""Core ML folders Apple's ml-stable-diffusion writes (``torch2coreml``), without a diffship manifest.

The fixture converts ``tiny`` the way ``python_coreml_stable_diffusion/torch2coreml.py`` does (read from
its source: file names ``Stable_Diffusion_version_<model>_<component>.mlpackage``; the text encoder's
float32 ``input_ids`` -> ``last_hidden_state``, ``pooled_outputs``; the UNet's float16 ``sample``,
``timestep`` and (B, D, 1, S) ``encoder_hidden_states`` -> ``noise_pred``; the VAE decoder's float16
``z`` -> ``image`` (post_quant_conv, decoder); the encoder's float16 ``x`` -> ``latent`` (encoder,
quant_conv); fp16 compute, macOS 13), through torch.export as diffship's exporter does (coremltools'
TorchScript path breaks on numpy >= 2.4). Apple's tools are not needed.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from diffship.backends.manifest import read_manifest
from diffship.errors import ExportedModelError

pytest.importorskip("coremltools")
pytestmark = pytest.mark.coreml
VERSION = "tiny"


def package_name(component: str) -> str:
    return f"Stable_Diffusion_version_{VERSION}_{component}.mlpackage"


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[:2]


class _Unet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states.squeeze(2).transpose(1, 2), return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.quant_conv, self.encoder = vae.quant_conv, vae.encoder

    def forward(self, x):
        return self.quant_conv(self.encoder(x))


def torch2coreml(pipe, out):
    """Write ``pipe`` as Apple's torch2coreml lays it out (see the module docstring)."""
    import coremltools as ct

    from diffship.exporters.coreml import strip_aliases
    from diffship.reference.attention import with_attention

    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    latent, seq = unet.config.sample_size, pipe.tokenizer.model_max_length
    size = latent * 8
    parts = {
        "text_encoder": (_TextEncoder(te), {"input_ids": ((1, seq), np.float32)},
                         ["last_hidden_state", "pooled_outputs"]),
        "unet": (_Unet(with_attention(unet, "original")),
                 {"sample": ((2, unet.config.in_channels, latent, latent), np.float16),
                  "timestep": ((2,), np.float16),
                  "encoder_hidden_states": ((2, unet.config.cross_attention_dim, 1, seq), np.float16)}, ["noise_pred"]),
        "vae_decoder": (_VaeDecoder(vae), {"z": ((1, vae.config.latent_channels, latent, latent), np.float16)},
                        ["image"]),
        "vae_encoder": (_VaeEncoder(vae), {"x": ((1, 3, size, size), np.float16)}, ["latent"]),
    }
    out.mkdir(parents=True)
    for name, (module, inputs, outputs) in parts.items():
        example = tuple(torch.randint(0, 100, shape).float() if n == "input_ids" else torch.rand(shape)
                        for n, (shape, _) in inputs.items())
        with torch.no_grad():
            program = torch.export.export(module.eval(), example).run_decompositions({})
        strip_aliases(program)
        model = ct.convert(program, inputs=[ct.TensorType(name=n, shape=s, dtype=d) for n, (s, d) in inputs.items()],
                           outputs=[ct.TensorType(name=o, dtype=np.float32) for o in outputs], convert_to="mlprogram",
                           minimum_deployment_target=ct.target.macOS13, skip_model_load=True)
        model.version = VERSION
        model.user_defined_metadata["com.github.apple.ml-stable-diffusion.version"] = "1.1.1"
        model.save(str(out / package_name(name)))
    (out / package_name("safety_checker")).mkdir()  # torch2coreml writes one; diffship leaves it out
    return out


@pytest.fixture(scope="module")
def apple(tiny_pipe, tmp_path_factory):
    return torch2coreml(tiny_pipe, tmp_path_factory.mktemp("apple") / "Resources-src")


def test_an_apple_folder_reads_as_a_manifest_in_the_spec_names(apple):
    m = read_manifest(apple)
    assert m.origin == "apple-torch2coreml" and m.backend == "coreml" and m.precision == "fp16"
    assert m.source.name == VERSION and m.source.fingerprint == "" and m.files == {}
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}  # no safety checker
    assert m.tasks == ["text2img", "img2img", "inpaint"] and m.shapes.static
    assert (m.shapes.profile.height, m.shapes.profile.width, m.shapes.profile.guidance) == (64, 64, True)
    assert m.versions["ml-stable-diffusion"] == "1.1.1" and m.versions["coremltools"]
    unet = m.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert [t.name for t in unet.outputs] == ["out_sample"] and unet.details.model_names == {"out_sample": "noise_pred"}
    assert unet.inputs[2].dims[1] == 77 and unet.details.model_inputs[2].layout == "bc1s"
    assert unet.details.model_inputs[0].dtype == "float16" and unet.details.package == package_name("unet")
    assert [t.name for t in m.components["text_encoder"].outputs] == ["last_hidden_state", "pooler_output"]
    assert m.components["vae_decoder"].details.model_names == {"latent_sample": "z", "sample": "image"}
    assert m.components["vae_encoder"].details.model_names == {"sample": "x", "latent_parameters": "latent"}


def test_parity_checks_an_apple_folder_with_the_configs_of_its_source(apple):
    from diffship.parity.compare import ParitySettings, check_parity

    report = check_parity("tiny", apple, settings=ParitySettings(steps=3, tasks=("text2img", "img2img")))
    assert report.passed, report.failures()
    assert "apple-torch2coreml export, no diffship manifest: files and source not verified" in report.evaluator
    assert {i.task for i in report.images} == {"text2img", "img2img"}


def test_an_apple_folder_needs_its_source_and_adopt_writes_its_configs(apple, tmp_path, capsys):
    from diffship.cli import main
    from diffship.runtimes.pipeline import load_pipeline

    with pytest.raises(ExportedModelError, match="carries no model_index.json.*adopt"):
        load_pipeline(apple)
    pipe = load_pipeline(apple, source="tiny")
    image = pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    folder = shutil.copytree(apple, tmp_path / "adopted")
    assert main(["adopt", str(folder)]) == 2 and "--source SOURCE" in capsys.readouterr().err
    assert main(["adopt", str(folder), "--source", "tiny"]) == 0, capsys.readouterr().err
    m = read_manifest(folder)  # verified: every package file and config hashed
    assert m.origin == "apple-torch2coreml" and m.source.fingerprint and m.components["unet"].files == ["config.json"]
    assert (folder / "model_index.json").is_file() and (folder / "tokenizer" / "vocab.json").is_file()
    again = load_pipeline(folder)("a cat", num_inference_steps=2, output_type="np",
                                  generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(again, image)
    from diffship.bench.plan import compared
    from diffship.configs.bench_presets import BenchSettings
    from diffship.errors import ConfigError

    with pytest.raises(ConfigError, match="was exported from 'tiny', not from 'tiny-sdxl'"):
        compared(BenchSettings(source="tiny-sdxl", compare=(str(folder),)), set())
    (folder / package_name("unet") / "Manifest.json").write_text("{}")
    with pytest.raises(ExportedModelError, match="does not match the sha256"):
        read_manifest(folder)


def test_a_source_of_another_family_is_refused(apple):
    from diffship.runtimes.pipeline import load_pipeline

    with pytest.raises(ExportedModelError, match="stable-diffusion pipeline, but the source given is"):
        load_pipeline(apple, source="tiny-sdxl")


@pytest.mark.parametrize("names, refused", [
    ([package_name("text_encoder_2")], "SDXL"),
    ([package_name("unet_chunk1"), package_name("unet_chunk2")], "chunked UNet"),
    (["Stable_Diffusion_version_a_unet.mlpackage", "Stable_Diffusion_version_b_text_encoder.mlpackage"],
     "more than one conversion"),
    (["TextEncoder.mlmodelc", "Unet.mlmodelc"], "compiled Core ML models"),
    (["Unet.mlpackage"], "lacks Apple's text_encoder, vae_decoder"),
])
def test_layouts_diffship_cannot_map_are_refused_by_name(tmp_path, names, refused):
    for name in names:
        (tmp_path / name).mkdir()
    with pytest.raises(ExportedModelError, match=refused):
        read_manifest(tmp_path)


def test_an_unknown_output_name_is_refused(apple, tmp_path):
    from diffship.packaging.swift import rename_outputs

    folder = tmp_path / "renamed"
    folder.mkdir()
    for name in ("text_encoder", "unet", "vae_decoder"):
        shutil.copytree(apple / package_name(name), folder / package_name(name))
    rename_outputs(folder / package_name("vae_decoder"), {"image": "decoded"})
    with pytest.raises(ExportedModelError, match="vae_decoder has 'decoded', which diffship cannot map"):
        read_manifest(folder)


def test_bench_measures_an_apple_folder_beside_eager(apple, tmp_path):
    from diffship.bench.records import read_results
    from diffship.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--backends", "torch", "--torch-precisions", "fp32", "--steps", "2", "--repeats", "1",
                 "--e2e-repeats", "1", "--warmup", "0", "--compare", str(apple), "--out", str(out)]) == 0
    doc = read_results(out / "results.json")
    subject = doc.subject(apple.name)
    assert subject.runs and subject.origin == "apple-torch2coreml" and subject.backend == "coreml"
    assert subject.export is None and subject.size_bytes > 0 and "MIL reference" in subject.runtime
    e2e = doc.find(kind="pipeline", subject=apple.name)
    assert e2e and e2e[0].parity.psnr_db > 40
    assert f"{apple.name} (apple-torch2coreml)" in (out / "results.md").read_text()

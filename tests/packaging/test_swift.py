"""``diffship package --target swift``: the resource folder of Apple's Swift StableDiffusionPipeline."""

from __future__ import annotations

import json
import platform

import pytest

pytestmark = pytest.mark.coreml
ct = pytest.importorskip("coremltools", reason="the coreml extra is not installed")

from diffship.cli import main  # noqa: E402
from diffship.errors import DiffshipError  # noqa: E402
from diffship.packaging.swift import package_swift  # noqa: E402

ON_MAC = platform.system() == "Darwin"


from conftest import mlpackage_io as io  # noqa: E402


def weight_bytes(package):
    return sum(p.stat().st_size for p in package.rglob("weight.bin"))


@pytest.fixture(scope="module")
def packaged(export_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("swift") / "Resources"
    facts = package_swift(export_dir("coreml"), out, compile_models=False)
    return out, facts


def test_layout_matches_what_the_swift_pipeline_loads(packaged):
    out, facts = packaged
    names = sorted(p.name for p in out.iterdir())
    assert names == ["TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "VAEEncoder.mlpackage",
                     "compile-models.sh", "diffship-package.json", "merges.txt", "vocab.json"]
    assert facts["resources"] == [n for n in names if n != "diffship-package.json"] and facts["compiled"] is False
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    text_in, text_out = io(out / "TextEncoder.mlpackage")
    assert text_in == [("input_ids", [1, 77], float32)] and text_out[0][:2] == ("last_hidden_state", [1, 77, 32])
    unet_in, unet_out = io(out / "Unet.mlpackage")
    assert [(n, s) for n, s, _ in unet_in] == [("sample", [2, 4, 8, 8]), ("timestep", [2]),
                                               ("encoder_hidden_states", [2, 32, 1, 77])]
    assert len(unet_out) == 1
    assert [(n, s) for n, s, _ in io(out / "VAEDecoder.mlpackage")[1]] == [("sample", [1, 3, 64, 64])]
    assert [(n, s) for n, s, _ in io(out / "VAEEncoder.mlpackage")[1]] == [("latent_parameters", [1, 8, 8, 8])]
    script = (out / "compile-models.sh").read_text()
    assert "xcrun coremlcompiler compile" in script and len(script.strip().splitlines()) == 3


def test_vocabulary_is_clips(packaged, tiny_pipe):
    out, _ = packaged
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and merges[1] == "i n" and len(merges) == 48895
    ids = tiny_pipe.tokenizer("a photo of a cat").input_ids
    assert [vocab["a</w>"], vocab["photo</w>"], vocab["cat</w>"]] == [ids[1], ids[2], ids[5]]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_chunked_unet_halves_chain_to_the_whole(export_dir, tmp_path, capsys, precision):
    """fp32 programs from torch.export hold their weights before the first operation: without moving them
    beside their use, chunk 1 was a few operations and no weights."""
    out = tmp_path / "Resources"
    assert main(["package", str(export_dir("coreml", precision)), str(out), "--target", "swift", "--chunk-unet",
                 "--no-compile"]) == 0
    printed = capsys.readouterr().out
    assert "chained UNet chunks match the whole UNet" in printed and "compile-models.sh on a Mac" in printed
    assert not (out / "Unet.mlpackage").exists()
    first, second = out / "UnetChunk1.mlpackage", out / "UnetChunk2.mlpackage"
    share = weight_bytes(first) / (weight_bytes(first) + weight_bytes(second))
    assert 0.4 <= share <= 0.6  # about half the weights each
    facts = json.loads((out / "diffship-package.json").read_text())
    assert facts["chunked"] and facts["chunk_max_abs_error"] <= 1e-3
    first_in, first_out = io(first)
    second_in, second_out = io(second)
    assert {n for n, _, _ in first_out} <= {n for n, _, _ in second_in} and len(second_out) == 1
    assert first_in[0][0] == "sample"


def test_what_cannot_be_packaged_is_refused(export_dir, tmp_path, capsys):
    with pytest.raises(DiffshipError, match="was exported for onnx; --target swift packages Core ML exports"):
        package_swift(export_dir("onnx"), tmp_path / "a")
    partial = export_dir("coreml", components=["unet", "vae_decoder"], backend_options={"sizes": "96x64,128x128"})
    with pytest.raises(DiffshipError, match="lacks text_encoder, which the Swift pipeline needs"):
        package_swift(partial, tmp_path / "b")
    code = main(["package", str(partial), str(tmp_path / "c"), "--target", "android"])
    assert code == 2 and "unknown package target 'android'; choose one of: swift" in capsys.readouterr().err
    if not ON_MAC:
        with pytest.raises(DiffshipError, match="compiling Core ML models needs xcrun coremlcompiler"):
            package_swift(export_dir("coreml"), tmp_path / "d", compile_models=True)
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.macos
@pytest.mark.skipif(not ON_MAC, reason="compiling .mlmodelc needs macOS with Xcode (xcrun coremlcompiler)")
def test_compiled_resources_on_macos(export_dir, tmp_path):
    out = tmp_path / "Resources"
    facts = package_swift(export_dir("coreml"), out, chunk_unet=True)
    assert facts["compiled"]
    for name in ("TextEncoder", "UnetChunk1", "UnetChunk2", "VAEDecoder", "VAEEncoder"):
        assert (out / f"{name}.mlmodelc" / "model.mil").is_file()
    assert not list(out.glob("*.mlpackage")) and not (out / "compile-models.sh").exists()


def test_every_value_the_swift_schedulers_assume_is_checked(tmp_path):
    """Apple's Swift schedulers hard-code the beta range and schedule, 1000 train steps, steps offset 1 and
    epsilon prediction; its decoder assumes SD's latent scale factor. Each difference becomes a note."""
    from diffship.packaging.swift import _scheduler_notes

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "vae_decoder").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.02, "num_train_timesteps": 500, "steps_offset": 0}))
    (tmp_path / "vae_decoder" / "config.json").write_text(json.dumps({"scaling_factor": 0.13025}))
    notes = _scheduler_notes(tmp_path)
    assert [n.split(" = ")[0] for n in notes[:4]] == ["the scheduler config sets prediction_type",
                                                     "the scheduler config sets beta_end",
                                                     "the scheduler config sets num_train_timesteps",
                                                     "the scheduler config sets steps_offset"]
    assert "decoderScaleFactor" in notes[4] and len(notes) == 5

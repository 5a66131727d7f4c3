"""What diffship refuses: every case of the trust issue on ``tiny``, each failing before the fix.

A sceptical user and an attacker tried these; each must end in one clear line and the documented exit
code (README "What diffship refuses"), never in a wrong export, a silently replaced file or a NaN image.
Exports are the session's shared ONNX one, copied where a case tampers with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from diffship.backends.manifest import read_manifest
from diffship.cli import main
from diffship.errors import (DiffshipError, ExportedModelError, NonFiniteError, OptionError, ShapeError,
                             SourceError)
from diffship.workflows import export_pipeline

pytestmark = pytest.mark.onnx
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("diffship: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def copy(export_dir, tmp_path) -> Path:
    """A private copy of the shared ONNX export of tiny, to tamper with."""
    return Path(shutil.copytree(export_dir("onnx"), tmp_path / "export"))


def rewrite_manifest(folder: Path, edit=lambda data: None) -> None:
    """Re-hash the folder and apply ``edit`` to the manifest, as someone editing an export by hand would."""
    read_manifest(folder, verify=False).write(folder)
    data = json.loads((folder / "diffship.json").read_text())
    edit(data)
    (folder / "diffship.json").write_text(json.dumps(data))


# --- 1. loading never imports code named by the export --------------------------------------------------


def test_model_index_cannot_make_the_loader_import_code(copy, monkeypatch, tmp_path):
    from diffship.runtimes.pipeline import load_pipeline

    marker = tmp_path / "ran"
    (copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Tok:\n    pass\n")
    index = json.loads((copy / "model_index.json").read_text())
    index["tokenizer"] = ["evil", "Tok"]
    (copy / "model_index.json").write_text(json.dumps(index))
    rewrite_manifest(copy)  # the manifest is not a signature: it lists the file, so it verifies
    monkeypatch.syspath_prepend(str(copy))  # as when diffship runs from inside the folder
    with pytest.raises(ExportedModelError, match=r"names evil.Tok for 'tokenizer'.*imports no other code"):
        load_pipeline(copy)
    assert not marker.exists()


# --- 2. wrong weights are refused, not exported ---------------------------------------------------------


@pytest.fixture
def source(tiny_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "source"))


@pytest.mark.parametrize("damage, message", [
    ("missing", r"text_encoder: the weights do not fit its CLIPTextModel \(missing: "),
    ("unexpected", r"text_encoder: the weights do not fit its CLIPTextModel \(unexpected: extra.weight"),
])
def test_weights_that_do_not_fit_are_refused(source, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    path = source / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    if damage == "missing":
        del tensors[sorted(tensors)[3]]
    else:
        tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(SourceError, match=message):
        export_pipeline(source, tmp_path / "out", components=["text_encoder"])
    assert not (tmp_path / "out").exists()


def test_another_architecture_is_refused(source, tmp_path):
    index = json.loads((source / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "BertModel"]
    (source / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=r"text_encoder is transformers.BertModel .* is a transformers.CLIPTextModel"):
        export_pipeline(source, tmp_path / "out")


# --- 3. an export is exactly its manifest ---------------------------------------------------------------


def test_a_file_the_manifest_does_not_list_is_refused(copy):
    (copy / "unet" / "extra.onnx").write_bytes(b"not in the manifest")
    with pytest.raises(ExportedModelError, match=r"unet/extra.onnx is not listed in diffship.json"):
        read_manifest(copy)


def test_a_manifest_that_lists_nothing_is_refused(copy):
    rewrite_manifest(copy, lambda data: data.update(files={}))
    with pytest.raises(ExportedModelError, match=r"is not listed in diffship.json"):
        read_manifest(copy)


def test_paths_outside_the_folder_are_refused(copy):
    rewrite_manifest(copy, lambda data: data["files"].update({"../outside.txt": "0" * 64}))
    with pytest.raises(ExportedModelError, match=r"the path '../outside.txt' leaves the export folder"):
        read_manifest(copy, verify=False)


def test_symbolic_links_are_refused(copy, tmp_path):
    (tmp_path / "elsewhere.txt").write_text("x")
    (copy / "unet" / "link.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(ExportedModelError, match=r"unet/link.txt is a symbolic link"):
        read_manifest(copy)


def test_inspect_prints_manifest_text_as_plain_text(copy, capsys):
    rewrite_manifest(copy, lambda data: data["source"].update(name="[bold red]x[/] \x1b[31mred"))
    code, out, err = run(capsys, "inspect", copy)
    assert code == 0, err
    assert "[bold red]x[/] ?[31mred" in out and "\x1b" not in out


# --- 4. one writer wins, nothing is overwritten unasked ---------------------------------------------------


def test_a_second_writer_of_the_same_folder_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "w") as held:  # another export holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DiffshipError, match=r"is being written by another diffship process"):
            export_pipeline("tiny", out, components=["vae_decoder"])
    assert not out.exists()


def test_overwrite_replaces_only_a_parsable_export(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "diffship.json").write_text("{}")  # a user's file of that name is not an export
    (project / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "export", "tiny", project, "--component", "vae_decoder", "--overwrite")
    assert code == 2 and "is not a diffship export" in error_line(err)
    assert (project / "notes.txt").read_text() == "mine"


def test_generate_never_overwrites_an_image(export_dir, tmp_path, capsys):
    args = ("generate", export_dir("onnx"), "--prompt", "a cat", "--steps", "1", "--out", tmp_path)
    assert run(capsys, *args)[0] == 0
    first = (tmp_path / "seed0-0.png").read_bytes()
    code, _, err = run(capsys, *args, "--guidance", "3")
    assert code == 2 and "seed0-0.png already exists; pass --overwrite" in error_line(err)
    assert (tmp_path / "seed0-0.png").read_bytes() == first


# --- 5. interrupts exit 130/143 and leave nothing half-written -----------------------------------------


def test_ctrl_c_during_export_exits_130(tmp_path, capsys, monkeypatch):
    import diffship.exporters.onnx as onnx_exporter

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_exporter, "export", interrupted)
    code, _, err = run(capsys, "export", "tiny", tmp_path / "out", "--component", "unet")
    assert code == 130 and "diffship: interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_export_exits_143(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        import diffship.exporters.onnx as onnx_exporter
        from diffship.cli import main

        def slow(*args, **kwargs):
            print("exporting", flush=True)
            time.sleep(60)

        onnx_exporter.export = slow
        sys.exit(main(["export", "tiny", {str(tmp_path / "out")!r}, "--component", "unet"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.readline().strip() == "exporting"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "diffship: terminated" in err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_leftovers_are_removed_by_the_next(tmp_path):
    from diffship._files import atomic_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".other.partial-{dead.pid}-abc123"
    stale.mkdir()
    mine = tmp_path / f".mine.partial-{os.getpid()}-abc123"  # a live process's: kept
    mine.mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not stale.exists() and mine.exists() and (tmp_path / "out" / "f").is_file()


# --- 6. non-finite numbers are errors, never images -----------------------------------------------------


def test_infinite_guidance_writes_no_image(export_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", export_dir("onnx"), "--prompt", "a cat", "--steps", "3", "--guidance",
                       "inf", "--out", tmp_path)
    line = error_line(err)
    assert code == 2 and "holds NaN or Inf at timestep" in line and "denoising step 2" in line
    assert not list(tmp_path.glob("*.png"))


def test_nan_latents_are_refused_through_the_api(export_dir):
    from diffship.runtimes.pipeline import load_pipeline

    pipe = load_pipeline(export_dir("onnx"))
    latents = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(NonFiniteError, match=r"unet: its input sample holds NaN or Inf at timestep .* step 1"):
        pipe("a cat", num_inference_steps=2, latents=latents, output_type="np")
    raw = load_pipeline(export_dir("onnx"), check_finite=False)  # the opt-out measures raw speed
    assert np.isnan(raw("a cat", num_inference_steps=2, latents=latents, output_type="np").images).any()


# --- 7. checks come before the work ---------------------------------------------------------------------


@pytest.mark.parametrize("size, message", [
    ("72x72", r"height 72 is not a positive multiple of 16"),
    ("8192x8192", r"alone take \d+\.\d GB, and this machine has"),
])
def test_static_sizes_that_can_never_run_are_refused(tmp_path, capsys, size, message):
    code, _, err = run(capsys, "export", "tiny", tmp_path / "out", "--static", size)
    assert code == 2 and __import__("re").search(message, error_line(err))
    assert not (tmp_path / "out").exists()


def test_option_values_are_checked(tmp_path):
    with pytest.raises(OptionError, match=r"onnx export option external_data must be true or false or null, got 'maybe'"):
        export_pipeline("tiny", tmp_path / "out", backend_options={"external_data": "maybe"})


def test_output_paths_are_checked_before_the_run(export_dir, tmp_path, capsys, monkeypatch):
    import diffship.parity.compare as compare

    monkeypatch.setattr(compare, "check_parity", lambda *a, **k: pytest.fail("the run started"))
    (tmp_path / "a-folder").mkdir()
    code, _, err = run(capsys, "parity", "tiny", export_dir("onnx"), "--junit", tmp_path / "a-folder")
    assert code == 2 and "a-folder is a folder, not a file" in error_line(err)
    (tmp_path / "a-file").write_text("x")
    code, _, err = run(capsys, "generate", export_dir("onnx"), "--prompt", "x", "--out", tmp_path / "a-file")
    assert code == 2 and "a-file is a file, not a folder" in error_line(err)


# --- 8. exit codes: 2 for bad input and environment, 3 only for bugs -------------------------------------


@pytest.mark.parametrize("args, message", [
    (["export", "tiny", "out", "--batch", "0"], "Invalid value for '--batch'"),
    (["export", "tiny", "out", "--no-such-flag"], "No such option: --no-such-flag"),
    (["export", "tiny"], "Missing argument 'OUT'"),
])
def test_usage_errors_exit_2(capsys, args, message):
    code, _, err = run(capsys, *args)
    assert code == 2 and message in error_line(err)


def test_environment_errors_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "export", "tiny", blocker / "out", "--component", "vae_decoder")
    assert code == 2 and f"cannot write {blocker / 'out'}" in error_line(err)
    code, _, err = run(capsys, "export", "tiny", blocker, "--component", "vae_decoder")
    assert code == 2 and "already exists" in error_line(err)


# --- 9. smaller ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[-1] * 77]), r"input_ids holds -1, outside the vocabulary \(0\.\.49407\)"),
    (torch.full((1, 77), 3.0), r"input_ids must be integer token ids, got torch.float32"),
])
def test_token_ids_eager_torch_rejects_are_refused(export_dir, ids, message):
    from diffship.runtimes.pipeline import load_pipeline

    with pytest.raises(ShapeError, match=message):
        load_pipeline(export_dir("onnx")).text_encoder(ids)


def test_long_prompts_say_they_are_cut(export_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", export_dir("onnx"), "--prompt", "a cat " * 60, "--steps", "1",
                       "--out", tmp_path)
    assert code == 0 and "tokens; the text encoder takes 77, so the rest is cut" in err


def test_calibration_reports_progress_and_an_estimate(tiny_pipe):
    from diffship.reference.pipelines import specs_for_pipeline
    from diffship.reference.recording import calibration_inputs

    lines: list[str] = []
    unet = [s for s in specs_for_pipeline(tiny_pipe) if s.denoiser]
    calibration_inputs(tiny_pipe, unet, steps=1, prompts=("a", "b", "c"), progress=lines.append)
    assert lines[0] == "recording calibration inputs: prompt 1 of 3"
    assert lines[2].startswith("recording calibration inputs: prompt 3 of 3, about ") and lines[2].endswith(" s left")

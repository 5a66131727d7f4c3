"""``diffship tune``: candidates measured here (speed, image PSNR against eager fp32), the fastest meeting
the floor written with its runtime settings in the manifest, parity passing with the tuned mode."""

from __future__ import annotations

import json
import shutil

import pytest

from diffship.backends.manifest import MANIFEST, read_manifest
from diffship.bench.machine import bf16_native
from diffship.bench.tune import TABLE_JSON, TABLE_MD, Candidate, candidates, setting_variants, tune
from diffship.configs.bench_presets import TUNABLE
from diffship.errors import DiffshipError, ParityFailure
from diffship.parity.compare import ParitySettings, check_parity

FAST = ParitySettings(steps=4, tasks=("text2img",))
QUICK = dict(size=(64, 64), steps=2, repeats=1)


@pytest.fixture
def shared_fp32_export(export_dir, monkeypatch):
    """Tune's fp32 OpenVINO export is the session's shared one, copied (the ONNX test exports for real)."""
    import shutil

    import diffship.workflows.export as workflow

    def copied(source, out, *, backend, precision, **kwargs):
        assert (backend, precision) == ("openvino", "fp32") and kwargs["calibration_size"] == (64, 64)
        assert kwargs["calibration_steps"] == QUICK["steps"]  # calibrated at the steps it measures
        shutil.copytree(export_dir("openvino"), out)

    monkeypatch.setattr(workflow, "export_pipeline", copied)


@pytest.mark.openvino
def test_tune_openvino_writes_the_fastest_mode_meeting_the_floor(tmp_path, shared_fp32_export):
    pytest.importorskip("openvino")
    names = ["fp32@f32", "fp32@bf16"] if bf16_native() else ["fp32@f32"]
    out = tmp_path / "tuned"
    result = tune("tiny", out, "openvino", only=names, **QUICK)
    modes, settings = result.trials[:len(names)], result.trials[len(names):]
    assert [t.candidate.name for t in modes] == names and all(t.meets(35.0) for t in result.trials)
    # the fastest mode is measured again under other runtime settings: one dynamic model at least
    fastest = min(modes, key=lambda t: t.seconds).candidate
    assert [t.candidate for t in settings] == setting_variants("openvino", fastest)
    assert settings[0].candidate.runtime == {**fastest.runtime, "static_shapes": False}
    trials = {t.candidate.name: t for t in result.trials}
    assert result.chosen == min(trials.values(), key=lambda t: t.seconds).candidate.name
    m = read_manifest(out)  # the tune table is part of the export: hashed like every file
    assert {TABLE_JSON, TABLE_MD} <= set(m.files)
    chosen = trials[result.chosen].candidate
    assert m.runtime["inference_precision"] == chosen.runtime["inference_precision"]
    assert m.runtime["static_shapes"] == chosen.runtime.get("static_shapes", True)  # load_pipeline runs it so
    table = json.loads((out / TABLE_JSON).read_text())
    assert table["chosen"] == result.chosen and table["eager_seconds"] > 0
    assert "| eager fp32 (PyTorch) |" in (out / TABLE_MD).read_text()
    report = check_parity("tiny", out, settings=FAST)  # judged by the tuned mode's tolerances
    assert report.runtime["inference_precision"] == chosen.runtime["inference_precision"]
    assert report.passed, report.failures()


@pytest.mark.onnx
def test_tune_onnx_through_the_cli(tmp_path, capsys, export_dir, monkeypatch):
    pytest.importorskip("onnxruntime")
    import diffship.workflows.export as workflow
    from diffship.cli import main

    def copied(source, out, *, backend, precision, **kwargs):
        """The session's full-int8 export (calibrated at tiny's 64x64 too), copied: the suite exports it once
        per worker (tests/exporters/test_full_int8.py checks that export itself)."""
        assert (backend, precision) == ("onnx", "full-int8") and kwargs["calibration_size"] == (64, 64)
        assert kwargs["calibration_steps"] == 2
        shutil.copytree(export_dir("onnx", "full-int8"), out)

    monkeypatch.setattr(workflow, "export_pipeline", copied)

    out = tmp_path / "tuned"
    # one candidate keeps the test short (the fp32 one is the OpenVINO test's): full-int8, measured and chosen
    assert main(["tune", "tiny", str(out), "--backend", "onnx", "--size", "64x64", "--steps", "2", "--repeats", "1",
                 "--min-psnr", "20", "--candidates", "full-int8"]) == 0
    text = capsys.readouterr().out
    assert "full-int8" in text and "chosen" in text and "eager fp32 (PyTorch)" in text
    m = read_manifest(out)
    assert m.precision == "full-int8" and m.components["unet"].details.quantized_psnr
    report = check_parity("tiny", out, settings=FAST)
    assert report.passed, report.failures()


@pytest.mark.openvino
def test_tune_writes_nothing_when_no_mode_meets_the_floor(tmp_path, shared_fp32_export):
    pytest.importorskip("openvino")
    out = tmp_path / "tuned"
    with pytest.raises(ParityFailure, match="no openvino mode reached 500 dB.*nothing written") as failed:
        tune("tiny", out, "openvino", min_psnr=500, only=["fp32@f32"], **QUICK)
    assert failed.value.exit_code == 1 and failed.value.result.chosen is None
    assert not out.exists() and not list(tmp_path.iterdir())  # no candidate folders left behind


def test_setting_variants_add_a_thread_per_logical_cpu_only_where_there_are_more_than_cores(monkeypatch):
    import diffship.bench.tune as tune_module

    mode = Candidate("full-int8@bf16", "full-int8", {"inference_precision": "bf16"})
    monkeypatch.setattr(tune_module, "physical_cores", lambda: 2)
    monkeypatch.setattr(tune_module, "usable_cpus", lambda: 2)
    assert setting_variants("onnx", mode) == []
    assert [v.runtime for v in setting_variants("openvino", mode)] == [
        {"inference_precision": "bf16", "static_shapes": False}]
    monkeypatch.setattr(tune_module, "usable_cpus", lambda: 4)  # SMT: two threads per core
    assert [(v.name, v.runtime) for v in setting_variants("onnx", Candidate("fp32", "fp32"))] == [
        ("fp32 threads=4", {"threads": 4})]
    assert setting_variants("openvino", mode)[-1].runtime == {"inference_precision": "bf16", "threads": 4}


def test_tune_refuses_unknown_backends_and_candidates_before_work(tmp_path):
    with pytest.raises(DiffshipError, match="takes --backend onnx or openvino, not 'coreml'"):
        candidates("coreml")
    assert all(candidates(b) for b in TUNABLE)  # what bench settings accept, tune takes
    with pytest.raises(DiffshipError, match="unknown candidate.*int2.*onnx here has: fp32, full-int8"):
        tune("tiny", tmp_path / "x", "onnx", only=["int2"])
    assert not (tmp_path / "x").exists()


@pytest.mark.openvino
def test_tune_measures_given_exports_as_they_are_and_copies_the_chosen_one(tmp_path, export_dir, monkeypatch):
    """A benchmark run's exports are tuned without exporting again; the chosen one is copied (hard links),
    its original left as it was (no tune table, its own manifest)."""
    pytest.importorskip("openvino")
    import diffship.workflows.export as workflow

    def refused(*args, **kwargs):
        raise AssertionError("tune exported a precision it was given")

    monkeypatch.setattr(workflow, "export_pipeline", refused)
    given = tmp_path / "given"
    shutil.copytree(export_dir("openvino"), given)
    before = (given / MANIFEST).read_bytes()
    out = tmp_path / "tuned"
    result = tune("tiny", out, "openvino", only=["fp32@f32"], exports={"fp32": given}, **QUICK)
    assert result.chosen.startswith("fp32@f32") and result.trials[0].export_seconds is None
    assert (given / MANIFEST).read_bytes() == before and not (given / TABLE_JSON).exists()
    weights = out / "unet" / "openvino_model.bin"
    assert weights.stat().st_ino == (given / "unet" / "openvino_model.bin").stat().st_ino  # linked, not written
    assert read_manifest(out).runtime["inference_precision"] == "f32"  # verified: every file hashed
    with pytest.raises(DiffshipError, match="is a openvino fp32 export, not openvino int8"):
        tune("tiny", tmp_path / "x", "openvino", only=["fp32@f32"], exports={"int8": given}, **QUICK)


def test_bench_reuses_a_tuned_export_without_tuning_again(export_dir, tmp_path, monkeypatch):
    """``--reuse-exports``: a tuned folder of the same source and backend keeps the mode its tune.json chose."""
    import diffship._isolate
    from diffship.bench import plan
    from diffship.bench.records import SubjectRecord
    from diffship.bench.worker import Subject
    from diffship.configs.bench_presets import TUNED, from_mapping

    folder = tmp_path / "exports" / "onnx-tuned"
    shutil.copytree(export_dir("onnx", "fp32"), folder)
    (folder / TABLE_JSON).write_text(json.dumps({"chosen": "fp32"}))

    def not_run(*args, **kwargs):
        raise AssertionError("reused: nothing is tuned")

    monkeypatch.setattr(diffship._isolate, "run_isolated", not_run)
    settings = from_mapping({"backends": ["onnx"], "precisions": ["fp32"], "tune": ["onnx"]}, "test")
    p = plan.Planned(Subject("onnx-tuned", "onnx", TUNED), SubjectRecord("onnx-tuned", "onnx", TUNED))
    plan.tune_subject(p, settings, tmp_path / "exports", [p], reuse=True)
    assert (p.entry.tuned, p.entry.precision, p.entry.folder) == ("fp32", "fp32", str(folder))
    assert p.entry.size_bytes > 0 and p.entry.export is None  # no export figures: nothing was made
    # another source's tuned folder is not reused
    other = from_mapping({"source": "tiny-sdxl", "backends": ["onnx"], "precisions": ["fp32"], "tune": ["onnx"]}, "test")
    with pytest.raises(AssertionError, match="nothing is tuned"):
        plan.tune_subject(p, other, tmp_path / "exports", [p], reuse=True)


def test_bench_exports_calibrate_at_the_runs_size_and_steps(tmp_path, monkeypatch):
    """A calibrated bench subject records its calibration runs at the size and steps the bench measures (the
    VAE decoder calibrated on 10-step latents lost ~3 dB more on 4-step images than its own check predicted)."""
    import diffship._isolate
    from diffship.bench import plan
    from diffship.bench.records import SubjectRecord
    from diffship.bench.worker import Subject
    from diffship.configs.bench_presets import from_mapping

    seen = {}

    def isolated(what, fn, *args):
        seen.update(size=args[-2], steps=args[-1])
        raise AssertionError("not exported here")

    monkeypatch.setattr(diffship._isolate, "run_isolated", isolated)
    settings = from_mapping({"backends": ["openvino"], "precisions": ["full-int8"], "sizes": ["96x64"],
                             "steps": [3, 8]}, "test")
    p = plan.Planned(Subject("openvino-full-int8", "openvino", "full-int8"),
                     SubjectRecord("openvino-full-int8", "openvino", "full-int8"))
    with pytest.raises(AssertionError, match="not exported here"):
        plan.export_subject(p, settings, tmp_path, reuse=False)
    assert seen == {"size": (96, 64), "steps": 3}

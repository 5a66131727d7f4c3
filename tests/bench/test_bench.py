"""`diffship bench`: a tiny run end to end (schema, files, figures), interruption, compare, settings."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from diffship.bench.compare import compare
from diffship.bench.pool import rounds, series
from diffship.bench.records import SCHEMA_FILE, BenchResults, read_results
from diffship.bench.run import Progress, run_bench
from diffship.configs.bench_presets import BenchSettings, from_mapping, load_presets, preset
from diffship.configs.fields import parse
from diffship.cli import main
from diffship.errors import ConfigError

#: a tiny run with both sweeps, kept short: two sizes, two batches, two step counts, two schedulers.
TINY_ARGS = ["--preset", "tiny", "--sizes", "64x64,128x128", "--batches", "1,2", "--steps", "2,4",
             "--schedulers", "default,EulerDiscreteScheduler", "--repeats", "2", "--e2e-repeats", "1"]


def validate(path: Path) -> BenchResults:
    """The results file checked against the JSON Schema, then read as typed records."""
    jsonschema = pytest.importorskip("jsonschema", reason="the test extra is not installed")
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(json.loads(path.read_text()))
    return read_results(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    out = tmp_path_factory.mktemp("bench") / "tiny"
    # a tuned subject too: tune tries one mode (the run's own onnx-fp32 export, not exported again)
    assert main(["bench", *TINY_ARGS, "--backends", "torch,onnx", "--tune", "onnx", "--tune-candidates", "fp32",
                 "--out", str(out)]) == 0
    return out


@pytest.mark.onnx
def test_tiny_preset_writes_every_file_and_validates(tiny_run):
    for name in ("results.json", "results.csv", "results.md", "latency_by_backend.png", "resolution_scaling.png"):
        assert (tiny_run / name).stat().st_size > 0, name
    doc = validate(tiny_run / "results.json")
    assert doc.complete and doc.reference == "torch-fp32"
    assert doc.machine["isa"] is not None and doc.machine["versions"]["onnxruntime"]
    subjects = {s.name: s for s in doc.subjects}
    assert subjects["onnx-fp32"].export.seconds > 0
    # measured, then removed (no --keep-exports); its figures stay
    assert not (tiny_run / "exports" / "onnx-fp32").exists() and subjects["onnx-fp32"].size_bytes > 1e6
    assert subjects["onnx-fp32"].export.peak_rss_bytes > 100e6
    for s in subjects.values():
        assert s.runs or s.not_run, s
        if s.runs:
            assert s.load.seconds > 0 and s.memory.peak_rss_bytes > 100e6 and s.size_bytes > 1e6
    # every subject at every point, with parity next to the speed figure
    comps = doc.find(kind="component", subject="onnx-fp32")
    assert {(m.component, m.batch, m.height) for m in comps} >= {
        ("unet", 1, 64), ("unet", 2, 64), ("unet", 1, 128), ("vae_decoder", 1, 128), ("text_encoder", 2, 64)}
    for m in comps:
        assert m.latency_ms.n == 2 and m.latency_ms.p10 <= m.latency_ms.median <= m.latency_ms.p90
        assert m.parity.psnr_db == "inf" or m.parity.psnr_db > 90, m
    assert all(m.flops > 0 and m.gflops_per_s > 0 for m in comps)  # counted on eager torch-fp32
    unet = {(m.batch, m.height): m.flops for m in comps if m.component == "unet"}
    assert unet[(2, 64)] == 2 * unet[(1, 64)] and unet[(1, 128)] > 3 * unet[(1, 64)]  # 2x batch, 4x pixels
    e2e = doc.find(kind="pipeline", subject="onnx-fp32")
    assert {(m.scheduler, m.steps) for m in e2e} >= {("default", 2), ("default", 4), ("EulerDiscreteScheduler", 4)}
    for m in e2e:
        assert m.steps_per_s > 0 and m.parity.psnr_db > 60 and m.unet_calls >= m.steps
    # each run's time split by component, measured where the pipeline calls them, eager and exported alike
    for m in e2e + doc.find(kind="pipeline", subject="torch-fp32"):
        assert set(m.component_ms) == {"text_encoder", "unet", "vae_decoder"}, m.component_ms
        assert all(v > 0 for v in m.component_ms.values())
        assert sum(m.component_ms.values()) <= m.latency_ms.p90 + 1
    assert {s.scheduler for s in doc.schedulers} == {"default", "EulerDiscreteScheduler"}
    assert (tiny_run / "images" / "onnx-fp32" / "default-2steps-b1-64x64.png").is_file()
    tuned = subjects["onnx-tuned"]
    assert (tuned.tuned, tuned.precision, tuned.runs) == ("fp32", "fp32", True) and tuned.export.seconds > 0
    assert not (tiny_run / "exports" / "onnx-tuned").exists()  # removed once measured, like the others
    assert all(m.parity.psnr_db > 60 for m in doc.find(kind="pipeline", subject="onnx-tuned"))
    assert "onnx-tuned (fp32)" in (tiny_run / "results.md").read_text()


@pytest.mark.onnx
def test_csv_and_markdown_carry_the_measurements(tiny_run):
    doc = read_results(tiny_run / "results.json")
    rows = list(csv.DictReader((tiny_run / "results.csv").open()))
    assert sum(r["kind"] in ("component", "pipeline") for r in rows) == len(doc.measurements)
    assert any(r["kind"] == "export" and r["subject"] == "onnx-fp32" and float(r["peak_rss_bytes"]) > 0 for r in rows)
    md = (tiny_run / "results.md").read_text()
    assert "## Summary" in md and "| onnx-fp32 |" in md and "## Schedulers" in md and "## End to end" in md
    assert "time split (ms)" in md and ", rest " in md
    assert any(r["kind"] == "pipeline" and "unet" in json.loads(r["component_ms"]) for r in rows)
    assert "measured matmul peak (eager PyTorch, 2048^3): fp32 " in md and "% of fp32 peak)" in md


@pytest.mark.onnx
def test_compare_same_run_passes_and_planted_regression_fails(tiny_run, tmp_path, capsys):
    baseline = tiny_run / "results.json"
    assert main(["bench", "compare", str(baseline), str(baseline)]) == 0
    doc = json.loads(baseline.read_text())
    slow = copy.deepcopy(doc)
    target = next(m for m in slow["measurements"] if m["subject"] == "onnx-fp32" and m["component"] == "unet")
    target["latency_ms"]["median"] *= 1.5
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    capsys.readouterr()
    assert main(["bench", "compare", str(baseline), str(tmp_path / "slow.json")]) == 1
    captured = capsys.readouterr()
    assert "REGRESSION" in captured.out and "1 regression(s)" in captured.out
    # the same slow-down within a looser threshold passes
    assert main(["bench", "compare", str(baseline), str(tmp_path / "slow.json"), "--threshold", "0.6"]) == 0
    drift = copy.deepcopy(doc)
    target = next(m for m in drift["measurements"] if m["kind"] == "pipeline" and m["subject"] == "onnx-fp32")
    target["parity"]["psnr_db"] = 20.0
    (tmp_path / "drift.json").write_text(json.dumps(drift))
    assert main(["bench", "compare", str(baseline), str(tmp_path / "drift.json")]) == 1
    (tmp_path / "other.json").write_text(json.dumps({"schema": "diffship.parity/1"}))
    assert main(["bench", "compare", str(baseline), str(tmp_path / "other.json")]) == 2
    assert "not a diffship benchmark result" in capsys.readouterr().err


def test_compare_judges_each_figure():
    stats = {"median": 10.0, "p10": 10.0, "p90": 10.0, "mean": 10.0, "min": 10.0, "n": 1}
    base = {"created": "", "command": None, "settings": {}, "machine": {},
            "subjects": [{"name": "a", "backend": "onnx", "precision": "fp32",
                          "export": {"seconds": 10.0, "peak_rss_bytes": 100, "child_peak_rss_bytes": 0, "size_bytes": 1},
                          "memory": {"peak_rss_bytes": 1000, "rss_bytes": None, "peak_gpu_bytes": None}}],
            "measurements": [{"kind": "component", "subject": "a", "component": "unet", "batch": 1, "height": 64,
                              "width": 64, "latency_ms": stats, "first_call_ms": None, "flops": None,
                              "gflops_per_s": None, "parity": {"psnr_db": "inf", "max_abs": 0.0, "cosine": 1.0}}]}

    def results(data):
        return parse(BenchResults, data, "key")

    same = compare(results(base), results(base))
    assert same and not any(c.regression for c in same)
    worse = copy.deepcopy(base)
    worse["subjects"][0]["memory"]["peak_rss_bytes"] = 1200
    worse["measurements"][0]["parity"]["psnr_db"] = 120.0  # identical vs 120 dB: both beyond float noise
    flagged = {c.metric for c in compare(results(base), results(worse)) if c.regression}
    assert flagged == {"peak_rss_bytes"}
    worse["measurements"][0]["parity"]["psnr_db"] = "nan"
    assert {c.metric for c in compare(results(base), results(worse)) if c.regression} == {"peak_rss_bytes", "psnr_db"}


def test_interrupted_run_keeps_finished_results(tmp_path):
    class StopAtEndToEnd(Progress):
        def phase(self, name, total):
            if name == "end to end":
                raise KeyboardInterrupt

    settings = from_mapping({"backends": ["torch"], "torch_precisions": ["fp32"], "repeats": 1}, "test")
    with pytest.raises(KeyboardInterrupt):
        run_bench(settings, tmp_path, progress=StopAtEndToEnd())
    doc = validate(tmp_path / "results.json")
    assert not doc.complete
    assert sorted(m.component for m in doc.measurements) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert doc.subjects[0].memory.peak_rss_bytes > 0  # the worker was stopped and asked
    assert "incomplete run" in (tmp_path / "results.md").read_text()


class FakeWorker:
    """Answers like a worker; records the order of calls."""

    def __init__(self, name, log, reply=("ok", {"seconds": [0.5]})):
        self.name, self.log, self._reply = name, log, reply

    def request(self, *message):
        self.log.append(self.name)
        return self._reply


def test_rounds_interleave_and_rotate():
    order = [w for _, w in rounds(["a", "b", "c"], 3)]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_series_skips_and_drops_dead_workers():
    log: list[str] = []
    dead = []
    workers = [FakeWorker("a", log), FakeWorker("fixed", log, ("skip", "takes 64x64 only")),
               FakeWorker("gone", log, ("died", "killed"))]
    found = series(workers, lambda keep: ("component",), 1, 3, lambda w, why: dead.append((w.name, why)))
    assert found["a"]["seconds"] == [0.5] * 3 and found["a"]["first"] == 0.5 and found["a"]["kept"]
    assert found["fixed"]["skipped"] == "takes 64x64 only" and not found["fixed"]["seconds"]
    assert found["gone"]["skipped"].startswith("error") and dead == [("gone", "killed")]
    assert log.count("fixed") == 1 and log.count("gone") == 1  # not asked again


def test_presets_are_valid_and_sd15_arch_is_the_full_architecture():
    presets = load_presets()
    assert {"tiny", "sd15-arch"} <= set(presets)
    assert preset("sd15-arch").size == (256, 256)
    from diffship.reference.presets import RECIPES

    unet = RECIPES["sd15-arch"].unet
    assert unet["block_out_channels"] == (320, 640, 1280, 1280) and unet["cross_attention_dim"] == 768
    assert RECIPES["sd15-arch"].text_encoder["num_hidden_layers"] == 12


def test_sd3_arch_is_sd35_mediums_transformer_without_t5():
    import diffusers
    import torch

    from diffship.reference.presets import RECIPES

    recipe = RECIPES["sd3-arch"]
    assert preset("sd3-arch").source == "sd3-arch" and recipe.t5 is None
    with torch.device("meta"):  # the shape only: no 9 GB of weights
        transformer = getattr(diffusers, recipe.transformer_class)(**recipe.transformer)
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 2) == 2.24
    assert transformer.config.pooled_projection_dim == recipe.text_encoder["projection_dim"] + recipe.text_encoder_2["projection_dim"]


@pytest.mark.parametrize("data, message", [
    ({"sizes": ["64by64"]}, "not HEIGHTxWIDTH"),
    ({"sizes": ["60x64"]}, "multiples of 8"),
    ({"batches": [0]}, ">= 1"),
    ({"repeats": "3"}, "whole number"),
    ({"colour": 1}, r"unknown setting\(s\) colour"),
    ({"backends": "onnx"}, "must be a list"),
    ({"torch_precisions": ["int4"]}, "unknown torch precision"),
    ({"tune": ["coreml"]}, "tune takes onnx and openvino, not coreml"),
    ({"tune": ["onnx"], "export_only": True}, "cannot be combined with export_only"),
])
def test_bad_settings_are_refused(data, message):
    with pytest.raises(Exception, match=message):
        from_mapping(data, "test")


def test_bad_preset_file_names_the_table(tmp_path):
    (tmp_path / "p.toml").write_text('[fast]\nrepeats = 0\n')
    with pytest.raises(ConfigError, match=r"\[fast\].*repeats"):
        load_presets(tmp_path / "p.toml")


def test_unknown_backend_is_one_error_line(tmp_path, capsys):
    assert main(["bench", "--backends", "torch,tpu", "--out", str(tmp_path)]) == 2
    assert "unknown backend 'tpu'" in capsys.readouterr().err


def test_machine_info_has_the_facts():
    from diffship.bench.machine import machine_info, peak_rss_bytes

    info = machine_info({"torch": "x"})
    assert info["cpu"] and info["logical_cores"] >= 1 and info["memory_bytes"] > 0
    # the measured matmul peak that achieved GFLOP/s are set against (bf16 only where it is native)
    peaks = info["matmul_peak_gflops"]
    assert peaks["fp32"] > 1 and set(peaks) <= {"fp32", "bf16", "int8"}
    assert peaks.get("int8", 2) > 1  # torch._int_mm's 8-bit products, where this PyTorch has them
    assert peak_rss_bytes() > 10e6
    assert BenchSettings().validate() is not None


def test_rates_are_shown_against_the_peak_of_what_the_subject_computes_in():
    from diffship.bench.output import _rate

    peaks = {"fp32": 200.0, "bf16": 400.0, "int8": 800.0}
    assert _rate(600, peaks, "int8") == "600 (75% of int8 peak)"
    assert _rate(300, peaks, "bf16") == "300 (75% of bf16 peak)"
    assert _rate(150, peaks, None) == "150 (75% of fp32 peak)"  # records written before the field
    assert _rate(150, {"fp32": 200.0}, "fp16") == "150 (75% of fp32 peak)"  # no fp16 probe: the fp32 one
    assert _rate(150, {}, "fp32") == "150" and _rate(None, peaks, "fp32") == ""


def test_a_subject_computes_in_int8_for_full_int8_else_in_its_runtimes_precision():
    from types import SimpleNamespace

    from diffship.bench.worker import _compute

    def loaded(backend, precision, compute=None):
        runner = SimpleNamespace(compute_precision=compute)
        return SimpleNamespace(manifest=SimpleNamespace(backend=backend, precision=precision),
                               unet_runner=lambda: runner)

    assert _compute(loaded("onnx", "full-int8")) == "int8"  # 8-bit activations too, on either compute
    assert _compute(loaded("openvino", "full-int8", "bf16")) == "int8"
    assert _compute(loaded("openvino", "fp32", "bf16")) == "bf16"  # inference_precision=bf16
    assert _compute(loaded("openvino", "int8")) == "fp32"  # 8-bit weights compute in f32
    assert _compute(loaded("openvino", "hybrid-int8")) == "fp32"
    assert _compute(loaded("onnx", "fp16")) == "fp16"


def test_memory_groups_put_the_reference_in_every_group(monkeypatch):
    from diffship.bench import plan
    from diffship.bench.worker import Subject

    monkeypatch.setattr("diffship.reference.memory.available_memory_bytes", lambda: 10_000)
    monkeypatch.setattr(plan, "_MEMORY_SHARE", 1.0)
    monkeypatch.setattr(plan, "_footprint", lambda p, source_bytes: p.entry["need"])

    def planned(name, need):
        return plan.Planned(Subject(name, "x", "fp32"), {"need": need})

    subjects = [planned("ref", 4000), planned("a", 3000), planned("b", 2500), planned("c", 1000), planned("huge", 9000)]
    groups = plan.memory_groups(subjects, 0)
    assert [[p.subject.name for p in g] for g in groups] == [["ref", "a", "b"], ["ref", "c"], ["ref", "huge"]]
    assert plan.memory_groups(subjects[:3], 0) == [subjects[:3]]


@pytest.mark.onnx
def test_export_only_measures_one_component(tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    assert main(["bench", "--backends", "torch,onnx", "--export-only", "--component", "unet", "--keep-exports",
                 "--out", str(tmp_path)]) == 0
    doc = validate(tmp_path / "results.json")
    onnx = doc.subject("onnx-fp32")
    assert onnx.export.peak_rss_bytes > 0 and not onnx.runs and "export only" in onnx.not_run
    assert sorted(p.name for p in (tmp_path / "exports" / "onnx-fp32").iterdir() if p.is_dir()) == [
        "scheduler", "text_encoder", "tokenizer", "unet", "vae"]  # the other modules stay torch folders
    assert doc.complete and not doc.measurements
    with pytest.raises(ConfigError, match="needs export_only"):
        from_mapping({"components": ["unet"]}, "test")


def test_groups_measure_every_subject_once(tmp_path, monkeypatch):
    """When subjects do not fit in memory together, each group is led by the reference again, and the
    reference's figures are kept from the first group only."""
    from diffship.bench import plan
    from diffship.bench.records import key

    monkeypatch.setattr(plan, "_MEMORY_SHARE", 1e-9)  # nothing fits: one subject per group beside the reference
    settings = from_mapping({"backends": ["torch"], "torch_precisions": ["fp32", "bf16", "fp16"], "repeats": 1,
                             "e2e_repeats": 1, "steps": [2]}, "test")
    doc = run_bench(settings, tmp_path)
    assert doc.complete and doc.reference == "torch-fp32"
    keys = [key(m) for m in doc.measurements]
    assert len(keys) == len(set(keys))
    ran = [s.name for s in doc.subjects if s.runs]
    assert {m.subject for m in doc.measurements} == set(ran) and "torch-fp16" in ran
    fp16 = doc.find(subject="torch-fp16", kind="pipeline")
    assert fp16 and fp16[0].parity.psnr_db > 20  # compared with the reference of its own group


def test_peak_memory_is_each_process_own(tmp_path):
    """A process started while its parent holds much memory reports its own peak, not the parent's (Linux
    keeps ``ru_maxrss`` across exec: the SDXL export figures once included the 14 GB preset build)."""
    import sys

    from diffship._isolate import largest_child_rss_bytes, run_isolated
    from diffship.bench.machine import peak_rss_bytes

    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM is Linux's; elsewhere ru_maxrss is reported as it is")
    held = bytearray(800 * 1024**2)
    held[::4096] = b"\x01" * len(held[::4096])  # resident
    child = run_isolated("measuring a child", peak_rss_bytes)
    assert child < 400 * 1024**2 < 800 * 1024**2 < peak_rss_bytes()
    assert largest_child_rss_bytes() >= child
    del held

"""The benchmark records and ``bench/schema.json`` describe the same document: every record field is a
schema property and the reverse, so neither can change without the other."""

from __future__ import annotations

import json

import pytest

from diffship.bench.records import (SCHEMA_FILE, BenchResults, ComponentMeasurement, ExportFigures, ImageParity,
                                    LoadFigures, MemoryFigures, PipelineMeasurement, SchedulerSummary, Stats,
                                    SubjectRecord, TensorParity, stats_ms)
from diffship.configs.fields import names, to_data

SCHEMA = json.loads(SCHEMA_FILE.read_text())
SUBJECT = SCHEMA["$defs"]["subject"]
MEASUREMENT = SCHEMA["$defs"]["measurement"]


@pytest.mark.parametrize("record, schema", [
    (BenchResults, SCHEMA),
    (Stats, SCHEMA["$defs"]["stats"]),
    (SubjectRecord, SUBJECT),
    (ExportFigures, SUBJECT["properties"]["export"]),
    (LoadFigures, SUBJECT["properties"]["load"]),
    (MemoryFigures, SUBJECT["properties"]["memory"]),
    (SchedulerSummary, SCHEMA["properties"]["schedulers"]["items"]),
])
def test_record_fields_are_the_schema_properties(record, schema):
    properties = set(schema.get("properties", {})) | set(schema.get("required", []))
    assert set(names(record)) == properties


def test_measurements_cover_the_schema_and_its_conditions():
    properties = set(MEASUREMENT["properties"])
    assert set(names(ComponentMeasurement)) | set(names(PipelineMeasurement)) == properties
    required = set(MEASUREMENT["required"])
    by_kind = {rule["if"]["properties"]["kind"]["const"]: set(rule["then"]["required"])
               for rule in MEASUREMENT["allOf"] if "kind" in rule["if"]["properties"]}
    assert required | by_kind["component"] <= set(names(ComponentMeasurement))
    assert required | by_kind["pipeline"] <= set(names(PipelineMeasurement))
    parity = set(MEASUREMENT["properties"]["parity"]["properties"])
    assert set(names(TensorParity)) | set(names(ImageParity)) == parity


def test_a_document_of_records_validates_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="the test extra is not installed")
    doc = BenchResults(created="2026-01-01T00:00:00", command=None, machine={},
                       settings={"source": "tiny", "backends": ["torch"], "precisions": ["fp32"],
                                 "torch_precisions": ["fp32"], "sizes": ["64x64"], "batches": [1], "steps": [2],
                                 "schedulers": ["default"], "warmup": 0, "repeats": 1, "e2e_repeats": 1},
                       subjects=[SubjectRecord("torch-fp32", "torch", "fp32", runs=True)])
    doc.machine = {k: None for k in SCHEMA["properties"]["machine"]["required"]} | {
        "cpu": "x", "architecture": "x", "isa": [], "os": "x", "python": "3", "torch_threads": 1, "versions": {}}
    doc.measurements = [
        ComponentMeasurement(subject="torch-fp32", component="unet", batch=1, height=64, width=64,
                             latency_ms=stats_ms([0.1, 0.2]), first_call_ms=1.0, flops=10, gflops_per_s=1.0,
                             parity=TensorParity(psnr_db="inf", max_abs=0.0, cosine=1.0)),
        PipelineMeasurement(subject="torch-fp32", batch=1, height=64, width=64, steps=2, scheduler="default",
                            latency_ms=None, scheduler_class=None, step_ms=None, unet_calls=None, steps_per_s=None,
                            parity=None, skipped="fixed shape"),
    ]
    jsonschema.Draft202012Validator(SCHEMA).validate(doc.to_data())
    assert to_data(doc)["measurements"][0]["kind"] == "component"


@pytest.mark.parametrize("component, label", [("unet", "UNet"), ("transformer", "transformer")])
def test_the_summary_reports_the_families_denoiser(component, label):
    from diffship.bench.output import summary_rows

    settings = {"source": "x", "sizes": ["64x64"], "batches": [1], "steps": [2], "schedulers": ["default"]}
    doc = BenchResults(created="2026-01-01T00:00:00", command=None, machine={}, settings=settings,
                       subjects=[SubjectRecord("torch-fp32", "torch", "fp32", runs=True)])
    doc.measurements = [ComponentMeasurement(
        subject="torch-fp32", component=name, batch=1, height=64, width=64, latency_ms=stats_ms([ms / 1e3] * 3),
        first_call_ms=None, flops=None, gflops_per_s=None, parity=None)
        for name, ms in (("text_encoder", 1.0), (component, 250.0))]
    header, rows = summary_rows(doc)
    assert header[6] == f"{label} ms (batch 2)" and rows[0][6].startswith("250.0")

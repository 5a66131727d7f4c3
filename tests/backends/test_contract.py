"""The backend contract, checked for every backend in the registry.

Each record is complete (exporter, runner, option and detail records, tolerances for every precision, a
pytest marker); options are refused by name and type; an export's layout is what its record says and its
manifest details round-trip through JSON; runners check their inputs and refuse calls once closed; the
exported pipeline runs behind the diffusers interface at the export's own size (the only size a
fixed-shape export takes). Exports are the session's shared ones (``export_dir``), so this adds no export.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffship import backends
from diffship.backends import Details
from diffship.backends.manifest import Manifest, read_manifest
from diffship.configs import load_tolerances
from diffship.configs.fields import names, to_data
from diffship.errors import OptionError, RuntimeFailure, ShapeError


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in backends.names()])
def record(request) -> backends.Backend:
    backend = backends.get(request.param)
    if not backend.installed():
        pytest.skip(f"the {backend.extra} extra is not installed")
    return backend


def runnable(record: backends.Backend) -> None:
    if reason := record.unavailable_reason():
        pytest.skip(f"{record.name} exports cannot run here: {reason}")


def test_the_registry_lists_each_backend_once_by_its_name():
    assert backends.names() == sorted(backends.names())
    assert all(backends.get(name).name == name for name in backends.names())
    with pytest.raises(Exception, match="unknown backend 'nope'; choose one of: coreml, onnx, openvino, tensorrt"):
        backends.get("nope")


def test_record_is_complete(record, pytestconfig):
    assert callable(record.exporter_module().export)
    for options in (record.export_options, record.runtime_options):
        assert dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen
    # every option has a default
    assert record.parse_export_options({}) == record.export_options()
    assert record.parse_runtime_options({}) == record.runtime_options()
    assert issubclass(record.details, Details)
    assert "fp32" in record.precisions
    assert set(record.compute) <= set(record.precisions) and set(record.calibrated) <= set(record.precisions)
    for precision in record.precisions:
        load_tolerances(record.name, precision)  # parity has measured tolerances for each
    assert any(m.startswith(f"{record.name}:") for m in pytestconfig.getini("markers"))
    if record.installed(runtime=True):
        from diffship.runtimes.base import Runner

        assert issubclass(record.runner_class(), Runner)


def test_options_are_refused_by_name_and_type(record):
    with pytest.raises(OptionError, match=rf"unknown {record.name} export option\(s\) no_such_option; it takes: "):
        record.parse_export_options({"no_such_option": 1})
    with pytest.raises(OptionError, match=rf"unknown {record.name} runtime option\(s\) no_such_option; it takes: "):
        record.parse_runtime_options({"no_such_option": 1})
    typed = [(cls, f.name) for cls in (record.export_options, record.runtime_options)
             for f in dataclasses.fields(cls) if f.type in ("bool", "int", "int | None", "bool | None")]
    for cls, field in typed:
        parse = record.parse_export_options if cls is record.export_options else record.parse_runtime_options
        with pytest.raises(OptionError, match=rf"option {field} must be"):
            parse({field: "not-a-value"})


def test_layout_matches_the_record_and_details_round_trip(record, export_dir):
    out = export_dir(record.name)
    manifest = read_manifest(out)
    assert manifest.backend == record.name
    for name, entry in manifest.components.items():
        assert isinstance(entry.details, record.details), name
        if record.model_file:
            assert (out / name / record.model_file).exists(), name
        for file in entry.files:
            assert f"{name}/{file}" in manifest.files, file
        assert record.parse_details(to_data(entry.details, drop_none=True), name) == entry.details
        assert set(names(record.details)) >= set(to_data(entry.details, drop_none=True))
    assert Manifest.from_dict(manifest.to_dict(), "test") == manifest


def test_runners_check_inputs_and_close(record, export_dir):
    runnable(record)
    from diffship.runtimes import open_runner

    out = export_dir(record.name)
    for name, entry in read_manifest(out).components.items():
        with open_runner(record.name, out / name, entry) as runner:
            with pytest.raises(ShapeError, match=rf"{name}: expected inputs"):
                runner.infer({})
            wrong_rank = {i.name: np.zeros([1] * (len(i.dims) + 1), dtype=np.float32) for i in entry.inputs}
            with pytest.raises(ShapeError, match="dims"):
                runner.infer(wrong_rank)
        assert runner.closed
        with pytest.raises(RuntimeFailure, match="closed"):
            runner.infer({})


def test_pipeline_interface_at_the_exports_own_size(record, export_dir, tiny_pipe):
    runnable(record)
    from diffship.parity.metrics import image_metrics
    from diffship.runtimes.pipeline import open_export

    out = export_dir(record.name)
    with open_export(out) as loaded:
        profile = loaded.manifest.shapes.profile
        request = dict(prompt="a cat", num_inference_steps=2, height=profile.height, width=profile.width,
                       output_type="np")
        got = loaded.pipeline(**request, generator=torch.Generator().manual_seed(0)).images
    tiny_pipe.set_progress_bar_config(disable=True)
    want = tiny_pipe(**request, generator=torch.Generator().manual_seed(0)).images
    assert got.shape == (1, profile.height, profile.width, 3)
    limit = load_tolerances(record.name, loaded.manifest.precision).image.psnr_min
    assert image_metrics(want[0], got[0]).psnr >= limit
    assert all(r.closed for r in loaded.runners.values())

"""Streamed OpenVINO exports: the weights are graph inputs while the module is converted, then written into
the IR one at a time (:mod:`diffship.exporters.ov_stream`). Compared with exports of the loaded pipeline."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

pytestmark = pytest.mark.openvino
ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")

from diffship.backends.manifest import read_manifest  # noqa: E402
from diffship.parity.compare import ParitySettings, check_parity  # noqa: E402
from diffship.workflows import export_pipeline  # noqa: E402

FAST = ParitySettings(steps=2, tasks=("text2img",))


def constants(xml) -> dict[str, tuple[str, bytes, bool]]:
    """Every constant of more than one value in the IR, by name: its element type, its bytes, and whether it
    holds one value throughout (LayerNorm's zero biases: a loaded export folds such a weight into its op,
    an addition of zero, so its bytes are nowhere to compare)."""
    found = {}
    for op in ov.Core().read_model(xml).get_ops():
        if op.get_type_name() == "Constant" and int(np.prod(list(op.get_output_shape(0)) or [1])) > 1:
            data = op.get_data()
            found[op.get_friendly_name()] = (op.get_output_element_type(0).get_type_name(), data.tobytes(),
                                             bool(np.all(data == data.flat[0])))
    return found


def assert_streamed_weights_written_as_loaded(streamed, loaded) -> int:
    """Each weight the streamed export wrote (named ``self.<parameter>``) is in the loaded export: under its
    name with the same type and bytes where the loaded export names it, else among its constants' bytes
    (fp16 weights are unnamed there). Returns how many weights were compared."""
    compared = 0
    for component in read_manifest(streamed).components:
        ours, theirs = (constants(x / component / "openvino_model.xml") for x in (streamed, loaded))
        values = {data for _, data, _ in theirs.values()}
        for name, (kind, data, uniform) in ours.items():
            if not name.startswith("self.") or uniform:
                continue
            assert (theirs[name][:2] == (kind, data)) if name in theirs else data in values, f"{component}: {name}"
            compared += 1
    return compared


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_streamed_openvino_exports_of_tiny_write_the_loaded_exports_weights(export_dir, precision):
    """The same weights, so one parity run (of the streamed export) stands for both; int4 on the UNet only."""
    kwargs = {"components": ("unet",)} if precision == "int4" else {}
    streamed, loaded = export_dir("openvino", precision, **kwargs), export_dir("openvino", precision, stream=False, **kwargs)
    assert read_manifest(streamed).components.keys() == read_manifest(loaded).components.keys()
    assert assert_streamed_weights_written_as_loaded(streamed, loaded) > 100
    if precision != "fp32":  # NNCF's choice of 8- and 4-bit weights: the same layers, the same bytes
        kinds = [sorted(k for k, _, _ in constants(x / "unet" / "openvino_model.xml").values() if k in ("u8", "u4"))
                 for x in (streamed, loaded)]
        assert kinds[0] == kinds[1] and kinds[0]
        details = [read_manifest(x).components["unet"].details.int4 for x in (streamed, loaded)]
        assert details[0] == details[1]
    report = check_parity("tiny", streamed, settings=FAST)
    assert report.passed, report.failures()


def test_streamed_openvino_fp16_of_tiny_sdxl_writes_the_loaded_exports_weights(tmp_path):
    """The SDXL UNet's added conditions; fp16 weights (unnamed in a loaded export). (The second text encoder's
    names resolve as the ONNX streamed test checks: the same stored weights.)"""
    for stream in (True, False):
        export_pipeline("tiny-sdxl", tmp_path / str(stream), backend="openvino", precision="fp16", stream=stream,
                        components=["unet"])
    assert assert_streamed_weights_written_as_loaded(tmp_path / "True", tmp_path / "False") > 50
    report = check_parity("tiny-sdxl", tmp_path / "True", settings=FAST)
    assert report.passed, report.failures()


def test_each_weight_is_read_once_as_it_is_written_and_released(tmp_path, monkeypatch):
    """No weight is read before the IR is saved, none twice, and no two are alive at once."""
    from diffship.reference import weights

    reads, alive, most = [], set(), [0]
    read = weights.StoredWeights.read

    def watched(self, name, dtype=None):
        import traceback

        tensor = read(self, name, dtype)
        reads.append((name, any(f.name == "write_weights" for f in traceback.extract_stack())))
        alive.add(id(tensor))
        most[0] = max(most[0], len(alive))
        weakref.finalize(tensor, alive.discard, id(tensor))
        return tensor

    monkeypatch.setattr(weights.StoredWeights, "read", watched)
    export_pipeline("tiny", tmp_path / "out", backend="openvino", precision="int8", components=["text_encoder", "unet"])
    assert reads and all(writing for _, writing in reads)
    assert len({name for name, _ in reads}) == len(reads)
    assert most[0] == 1


def test_a_weight_that_does_not_fit_its_traced_input_is_a_bug_not_a_disk_error(tmp_path, monkeypatch):
    """The IR rewrite checks each weight against the input it replaces; a mismatch surfaces as an internal
    error (exit 3), not as the "check the free disk space" a failed write gets."""
    from diffship.exporters import ov_stream

    values = ov_stream._values
    monkeypatch.setattr(ov_stream, "_values", lambda weight, read: {
        part: (array, shape + (1,)) for part, (array, shape) in values(weight, read).items()})
    with pytest.raises(AssertionError, match="stored shape .* is not the traced"):
        export_pipeline("tiny", tmp_path / "out", backend="openvino", components=["vae_decoder"])
    assert not (tmp_path / "out").exists()

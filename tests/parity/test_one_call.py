"""``diffship parity SOURCE EXPORTED --component NAME``: one call, eager reading its weights layer by layer."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.openvino
pytest.importorskip("openvino", reason="the openvino extra is not installed")

from diffship.cli import main  # noqa: E402
from diffship.errors import DiffshipError  # noqa: E402
from diffship.parity.one_call import check_one_call  # noqa: E402


def test_one_call_of_a_component_passes_at_the_size_asked(export_dir):
    report = check_one_call("tiny", export_dir("openvino"), "unet", height=48, width=80)
    assert report.passed, report.failures()
    assert [c.component for c in report.components] == ["unet"] and report.components[0].calls == 1
    assert (report.settings["height"], report.settings["width"]) == (48, 80) and not report.images
    assert "layer by layer" in report.evaluator
    assert report.components[0].outputs[0].metrics.max_abs < 1e-4


def test_the_eager_side_computes_from_the_sources_weights(export_dir, monkeypatch):
    """Weights read 1% larger than stored: the eager reference moves and the check fails."""
    from diffship.reference import weights

    read = weights.StoredWeights.read
    monkeypatch.setattr(weights.StoredWeights, "read", lambda self, name, dtype=None: read(self, name, dtype) * 1.01)
    assert not check_one_call("tiny", export_dir("openvino"), "unet").passed


def test_refusals(export_dir):
    with pytest.raises(DiffshipError, match="has no component 'transformer'; it has: text_encoder"):
        check_one_call("tiny", export_dir("openvino"), "transformer")
    assert main(["parity", "tiny", str(export_dir("openvino")), str(export_dir("openvino")), "--component", "unet"]) == 2

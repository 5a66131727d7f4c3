"""Core ML itself (``MLModel.predict``) on macOS: parity of the exports on every compute unit.

These tests need macOS: elsewhere Core ML's runtime does not exist, and the MIL reference evaluator
checks the same exports (tests/exporters/test_coreml_export.py).
"""

from __future__ import annotations

import platform

import pytest

pytestmark = [pytest.mark.coreml, pytest.mark.macos,
              pytest.mark.skipif(platform.system() != "Darwin",
                                 reason="MLModel.predict (the Core ML runtime) exists only on macOS")]
pytest.importorskip("coremltools", reason="the coreml extra is not installed")


@pytest.mark.parametrize("compute_units", ["all", "cpuOnly", "cpuAndGPU", "cpuAndNeuralEngine"])
def test_fp16_parity_on_each_compute_unit(export_dir, compute_units):
    from diffship.parity.compare import check_parity

    report = check_parity("tiny", export_dir("coreml", "fp16"),
                          runtime_options={"evaluator": "coreml", "compute_units": compute_units})
    assert report.passed, report.failures()
    assert report.evaluator == f"Core ML runtime (macOS, compute units {compute_units})"


def test_fp32_parity_and_split_einsum(export_dir):
    from diffship.parity.compare import check_parity

    for out in (export_dir("coreml"), export_dir("coreml", backend_options={"attention": "split_einsum"},
                                                      components=["unet", "vae_decoder"])):
        report = check_parity("tiny", out, runtime_options={"evaluator": "coreml", "compute_units": "cpuOnly"})
        assert report.passed, report.failures()


def test_the_mil_reference_agrees_with_core_ml(export_dir):
    """The reference evaluator and Core ML compute the same fp32 UNet outputs."""
    import numpy as np
    import torch

    from diffship.backends.manifest import read_manifest
    from diffship.runtimes import open_runner

    out = export_dir("coreml")
    entry = read_manifest(out).components["unet"]
    feeds = {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([500.0, 500.0]),
             "encoder_hidden_states": torch.randn(2, 77, 32)}
    mil = open_runner("coreml", out / "unet", entry, evaluator="mil").infer(feeds)["out_sample"]
    core = open_runner("coreml", out / "unet", entry, evaluator="coreml", compute_units="cpuOnly").infer(feeds)
    np.testing.assert_allclose(core["out_sample"].numpy(), mil.numpy(), atol=1e-4)

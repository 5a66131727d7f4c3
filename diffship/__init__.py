"""diffship: export diffusers pipelines component by component (ONNX, OpenVINO, Core ML, TensorRT), run
them behind the diffusers pipeline interface, and prove parity with eager PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Keep `import diffship` cheap: torch and diffusers load on first use.
    if name == "load_pipeline":
        from diffship.runtimes.pipeline import load_pipeline

        return load_pipeline
    if name == "export_pipeline":
        from diffship.workflows.export import export_pipeline

        return export_pipeline
    if name == "check_parity":
        from diffship.parity.compare import check_parity

        return check_parity
    if name == "load_reference":
        from diffship.reference import load

        return load
    raise AttributeError(f"module 'diffship' has no attribute {name!r}")


__all__ = ["__version__", "check_parity", "export_pipeline", "load_pipeline", "load_reference"]

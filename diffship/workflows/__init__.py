"""Workflows that use exporters and runtimes together: :func:`export_pipeline` (export, probe, manifest)."""

from diffship.workflows.export import export_pipeline

__all__ = ["export_pipeline"]

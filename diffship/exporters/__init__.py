"""Exporters: one module per backend (``spec + module -> files + manifest entry``), named by its backend
record (:mod:`diffship.backends`). The whole-pipeline export is :func:`diffship.workflows.export_pipeline`."""

from diffship.exporters.base import ExportOptions

__all__ = ["ExportOptions"]

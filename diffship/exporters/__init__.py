"""Exporters: one module per backend, discovered by name, and the pipeline-level orchestration."""

from diffship.exporters.base import Artifact, ExportOptions
from diffship.exporters.pipeline import available_backends, backend_module, backends, export_pipeline

__all__ = ["Artifact", "ExportOptions", "available_backends", "backend_module", "backends", "export_pipeline"]

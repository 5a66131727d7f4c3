"""Runtimes: one module per backend runtime, and the diffusers pipelines built on them."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from diffship._registry import registered
from diffship.errors import MissingBackendError, UnavailableRuntimeError
from diffship.runtimes.base import Runner


def runtime_module(backend: str) -> ModuleType:
    """The runtime module that runs ``backend`` exports, checked to be importable."""
    return registered("diffship.runtimes", "BACKENDS", backend)


def runtime_available(backend: str) -> bool:
    """Whether ``backend`` exports can run here: packages installed and the platform able (GPU, macOS)."""
    return runtime_unavailable_reason(backend) is None


def runtime_unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` exports cannot run here (the error's message), or None when they can."""
    try:
        runtime_module(backend)
    except (MissingBackendError, UnavailableRuntimeError) as exc:
        return str(exc)
    return None


def open_runner(backend: str, folder: str | Path, component: dict[str, Any], **options: Any) -> Runner:
    """A :class:`Runner` for one exported component (``component`` is its manifest entry)."""
    return runtime_module(backend).open_runner(Path(folder), component, options)


def __getattr__(name: str):
    # load_pipeline pulls in diffusers; keep `import diffship.runtimes` light for the registry.
    if name == "load_pipeline":
        from diffship.runtimes.pipeline import load_pipeline

        return load_pipeline
    raise AttributeError(name)


__all__ = ["Runner", "load_pipeline", "open_runner", "runtime_available", "runtime_module", "runtime_unavailable_reason"]

"""Runtimes: one runner per backend (named by its record in :mod:`diffship.backends`), and the diffusers
pipelines built on them (:mod:`diffship.runtimes.pipeline`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship.backends import get
from diffship.backends.manifest import ComponentEntry
from diffship.errors import UnavailableRuntimeError
from diffship.runtimes.base import Runner


def open_runner(backend: str, folder: str | Path, entry: ComponentEntry, **options: Any) -> Runner:
    """A :class:`Runner` for one exported component (``entry`` is its manifest entry).

    Raises:
        MissingBackendError: the backend's runtime package is not installed (the message names the extra).
        UnavailableRuntimeError: this machine cannot run it (no NVIDIA GPU for TensorRT).
        OptionError: an unknown option, or a value of the wrong type or choice.
    """
    record = get(backend)
    runner_class = record.runner_class()
    if record.runtime_unavailable and (reason := record.runtime_unavailable()):
        raise UnavailableRuntimeError(reason)
    return runner_class(Path(folder), entry, record.parse_runtime_options(options))


def __getattr__(name: str):
    # load_pipeline pulls in diffusers; keep `import diffship.runtimes` light.
    if name in ("load_pipeline", "open_export"):
        from diffship.runtimes import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["Runner", "load_pipeline", "open_export", "open_runner"]

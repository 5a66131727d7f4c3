"""One exception hierarchy for everything diffship raises on purpose.

Every message says which step failed and what to do next; the CLI prints ``str(error)`` on one line
and exits non-zero (the traceback only with ``--debug``).
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages often span many), or its type name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class DiffshipError(Exception):
    """Base class of all diffship errors.

    CLI exit codes: 1 parity outside tolerance, 2 a DiffshipError or another bad input or environment
    problem (a usage error, a path that cannot be written, a full disk), 3 an unexpected internal error,
    130 Ctrl-C, 143 SIGTERM.
    """

    exit_code = 2


class SourceError(DiffshipError):
    """The model source (folder, checkpoint, preset) cannot be loaded."""


class UnsupportedPipelineError(SourceError):
    """The source is a diffusers pipeline of a class diffship does not export."""


class MissingBackendError(DiffshipError):
    """An optional backend package is not installed."""

    def __init__(self, backend: str, package: str, extra: str, hint: str = ""):
        super().__init__(
            f"the {backend} backend needs the '{package}' package, which is not installed; "
            f"install it with: {hint}pip install 'diffship[{extra}]'"
        )
        self.backend = backend
        self.extra = extra


class UnavailableRuntimeError(DiffshipError):
    """A backend's packages are installed but this machine cannot run it (no NVIDIA GPU, not macOS)."""


class ExportError(DiffshipError):
    """Exporting a component failed."""


class ExportedModelError(DiffshipError):
    """An exported folder is missing, incomplete, tampered with or unreadable."""


class RuntimeFailure(DiffshipError):
    """A backend runtime failed to load or run an exported component."""


class ShapeError(DiffshipError, ValueError):
    """An input has a shape, dtype or size the export cannot take."""


class NonFiniteError(DiffshipError):
    """A component received or produced NaN or Inf: never turned into an image."""


class ConfigError(DiffshipError):
    """A bundled or user-supplied configuration file is invalid."""


class OptionError(ConfigError):
    """A backend option (``-o KEY=VALUE``) is unknown or has a value of the wrong type, range or choice."""


class ParityFailure(DiffshipError):
    """Parity checks ran and at least one comparison is outside its tolerance."""

    exit_code = 1


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM). Like Ctrl-C it unwinds everything, removing what was
    half-written, so it derives from BaseException: no ``except Exception`` swallows it."""


class BenchRegression(DiffshipError):
    """``bench compare`` found figures that got worse beyond the threshold."""

    exit_code = 1

"""The backends diffship exports to and runs, as typed records (:class:`Backend`), in an explicit registry.

Each ``diffship/backends/<name>.py`` defines one record and what its exporter and its runtime both need;
this registry lists them. Nothing else in diffship discovers backends: a module is a backend because it
is listed here, not because it has some attribute.
"""

from __future__ import annotations

from diffship.backends.base import Backend, Details
from diffship.backends.coreml import COREML
from diffship.backends.onnx import ONNX
from diffship.backends.openvino import OPENVINO
from diffship.backends.tensorrt import TENSORRT
from diffship.errors import DiffshipError

#: every backend by name, in the order tools list them.
REGISTRY: dict[str, Backend] = {b.name: b for b in (COREML, ONNX, OPENVINO, TENSORRT)}


def get(name: str) -> Backend:
    """The backend ``name``; an error listing the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise DiffshipError(f"unknown backend {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def names() -> list[str]:
    """Every backend's name."""
    return list(REGISTRY)


def installed() -> list[str]:
    """Backends whose exporter's packages are installed here."""
    return [name for name, backend in REGISTRY.items() if backend.installed()]


def runtime_unavailable_reason(name: str) -> str | None:
    """Why ``name``'s exports cannot run here (a missing package, no GPU), or None when they can."""
    return get(name).unavailable_reason()


__all__ = ["REGISTRY", "Backend", "Details", "get", "installed", "names", "runtime_unavailable_reason"]

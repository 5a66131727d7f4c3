"""Discovery of backend modules, so adding a backend means adding a module and nothing else."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from functools import lru_cache
from types import ModuleType

from diffship.errors import MissingBackendError


@lru_cache(maxsize=None)
def modules_with(package: str, attribute: str) -> tuple[ModuleType, ...]:
    """The public modules of ``package`` that define ``attribute``, in name order.

    Backend modules import their heavy libraries lazily, so importing them all here is cheap.
    """
    pkg = importlib.import_module(package)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        if hasattr(mod, attribute):
            found.append(mod)
    return tuple(found)


def require_modules(backend: str, extra: str, *names: str) -> None:
    """Raise :class:`MissingBackendError` naming the pip extra if a module is missing (without importing it).

    A name ``"a|b"`` is satisfied by either module (TensorRT ships as ``tensorrt`` or ``tensorrt_rtx``).
    """
    for n in names:
        if not any(importlib.util.find_spec(alt) is not None for alt in n.split("|")):
            raise MissingBackendError(backend, n.replace("|", "' or '"), extra)


def module_versions(*names: str) -> dict[str, str]:
    """``__version__`` of each installed module among ``names`` (``"a|b"``: whichever is installed)."""
    out = {}
    for alt in (a for n in names for a in n.split("|")):
        if importlib.util.find_spec(alt) is not None:
            out[alt] = str(getattr(importlib.import_module(alt), "__version__", "unknown"))
    return out


def registered(package: str, attribute: str, name: str) -> ModuleType:
    """The module of ``package`` whose ``attribute`` names (or lists) ``name``, with its packages installed.

    A module may also define ``check_platform()``, raising
    :class:`~diffship.errors.UnavailableRuntimeError` where this machine cannot run it (no GPU, not macOS).

    Raises:
        DiffshipError: no such backend (the message lists the known ones).
        MissingBackendError: its packages are missing (the message names the pip extra).
        UnavailableRuntimeError: the packages are there but this platform cannot run the backend.
    """
    from diffship.errors import DiffshipError

    found = {}
    for mod in modules_with(package, attribute):
        value = getattr(mod, attribute)
        for key in (value,) if isinstance(value, str) else value:
            found.setdefault(key, mod)
    if name not in found:
        raise DiffshipError(f"unknown backend {name!r}; choose one of: {', '.join(found)}")
    mod = found[name]
    require_modules(name, mod.EXTRA, *mod.PACKAGES)
    if hasattr(mod, "check_platform"):
        mod.check_platform()
    return mod

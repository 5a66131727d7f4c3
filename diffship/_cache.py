"""The diffship cache's entries: what is there, how large, when last used; pruning and the size cap.

The cache (:func:`~diffship._files.cache_dir`) holds built presets (``<name>-v<version>/``), the ONNX
step of TensorRT exports (``onnx/<component>-<precision>-<key>/``) and TensorRT timing caches
(``tensorrt/*.timing.cache``). Everything in it can be rebuilt, so pruning loses time, never data.
A folder's modification time is its last use: readers :func:`touch` what they reuse.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from diffship._files import cache_dir, folder_bytes, remove_folder

#: entry kinds, by where they lie in the cache.
KINDS = ("preset", "onnx", "timing-cache")
#: entries used this recently are never removed by the cap: another export may be reading them now.
IN_USE_SECONDS = 600


@dataclass(frozen=True)
class CacheEntry:
    """One removable thing in the cache.

    Attributes:
        name: its path relative to the cache root (``onnx/unet-fp32-3f2a...``, ``tiny-v2``).
        kind: one of :data:`KINDS`.
        path: where it is.
        size_bytes: bytes of its files.
        last_used: when it was written or last reused (seconds since the epoch).
    """

    name: str
    kind: str
    path: Path
    size_bytes: int
    last_used: float


def _entry(path: Path, root: Path, kind: str) -> CacheEntry:
    return CacheEntry(path.relative_to(root).as_posix(), kind, path, folder_bytes(path), path.stat().st_mtime)


def entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache, oldest use first. Working folders (``.name.partial-*``), locks and
    anything diffship did not write are left out."""
    root = Path(root) if root else cache_dir()
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        if path.name.startswith(".") or not path.is_dir() or path.is_symlink():
            continue
        if path.name == "onnx":
            found += [_entry(p, root, "onnx") for p in sorted(path.iterdir())
                      if p.is_dir() and not p.name.startswith(".") and (p / "artifact.json").is_file()]
        elif path.name == "tensorrt":
            found += [_entry(p, root, "timing-cache") for p in sorted(path.glob("*.timing.cache")) if p.is_file()]
        elif (path / "model_index.json").is_file():
            found.append(_entry(path, root, "preset"))
    return sorted(found, key=lambda e: e.last_used)


def touch(path: Path) -> None:
    """Mark a reused entry as used now (its modification time), so the cap removes it last."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves; it only ages
        pass


def select(found: list[CacheEntry], *, kinds: tuple[str, ...] = (), older_than_days: float | None = None,
           max_bytes: int | None = None, keep: tuple[Path, ...] = (), now: float | None = None) -> list[CacheEntry]:
    """The entries to remove, oldest use first: of ``kinds`` (all when empty), those unused for
    ``older_than_days``, then the oldest until the rest fit in ``max_bytes``. ``keep`` is never chosen.
    Without ``older_than_days`` and ``max_bytes``, every entry of ``kinds``."""
    now = time.time() if now is None else now
    pool = [e for e in sorted(found, key=lambda e: e.last_used)
            if (not kinds or e.kind in kinds) and e.path not in keep]
    if older_than_days is None and max_bytes is None:
        return pool
    chosen = [e for e in pool if older_than_days is not None and now - e.last_used > older_than_days * 86400]
    if max_bytes is not None:
        total = sum(e.size_bytes for e in pool) + sum(e.size_bytes for e in found if e.path in keep)
        total -= sum(e.size_bytes for e in chosen)
        for e in pool:
            if total <= max_bytes:
                break
            if e not in chosen:
                chosen.append(e)
                total -= e.size_bytes
    return sorted(chosen, key=lambda e: e.last_used)


def remove(entry: CacheEntry) -> bool:
    """Remove one entry; False when another process is writing it (it stays)."""
    if entry.path.is_dir():
        return remove_folder(entry.path)
    try:
        entry.path.unlink()
    except FileNotFoundError:
        return False
    return True


def enforce_cap(kind: str, max_bytes: int, keep: Path, root: Path | None = None) -> list[CacheEntry]:
    """Keep the ``kind`` entries within ``max_bytes`` by removing the least recently used ones, never
    ``keep`` (the entry just written) nor one used in the last :data:`IN_USE_SECONDS`. Returns the removed."""
    now = time.time()
    found = [e for e in entries(root) if e.kind == kind]
    recent = tuple(e.path for e in found if now - e.last_used < IN_USE_SECONDS)
    chosen = select(found, max_bytes=max_bytes, keep=(Path(keep), *recent), now=now)
    return [e for e in chosen if remove(e)]

"""Small file helpers shared by exporters, loaders and reports: hashing, JSON, atomic folders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_fingerprint(module: Any) -> str:
    """sha256 of a Python module's code as parsed: comments, docstrings and formatting left out, so only
    a change in what the code does changes it (cache keys of generated artifacts)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def atomic_write(path: Path, data: str | bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide reports from web servers and CI artifact uploads
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def png_bytes(image) -> bytes:
    """A PIL image encoded as PNG."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cache_dir() -> Path:
    """diffship's cache folder: ``$DIFFSHIP_CACHE``, else ``$XDG_CACHE_HOME/diffship``, else ``~/.cache/diffship``."""
    if env := os.environ.get("DIFFSHIP_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffship"


def replaceable(folder: Path, marker: str = "diffship.json") -> bool:
    """Whether ``--overwrite`` may replace ``folder``: an empty folder, or one diffship wrote (has ``marker``)."""
    return folder.is_dir() and (not any(folder.iterdir()) or (folder / marker).is_file())


@contextlib.contextmanager
def atomic_folder(final: Path, overwrite: bool = False, marker: str = "diffship.json") -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``final`` only if the block completes.

    ``overwrite`` replaces an existing ``final`` only if it is empty or holds ``marker`` (diffship wrote it).

    An interrupted or failed write leaves ``final`` untouched (or absent); the temporary folder is
    removed on errors, and is named ``.<name>.partial-*`` so it is never mistaken for a result.
    """
    from diffship.errors import DiffshipError

    final = Path(final)
    if final.exists():
        if not overwrite:
            raise DiffshipError(f"{final} already exists; remove it or pass --overwrite")
        if not replaceable(final, marker):
            raise DiffshipError(f"{final} exists and is not a diffship output (or an empty folder); "
                                f"--overwrite only replaces those: choose another output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

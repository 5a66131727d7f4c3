"""File helpers shared by exporters, loaders and reports: hashing, JSON, atomic files and folders.

Writing a folder all at once (:func:`atomic_folder`) is what a careful tool guarantees (git's refusal to
clobber, pip's atomic installs): an interrupted or failed write leaves the destination as it was; of two
processes writing the same destination exactly one wins and the other says why; ``--overwrite`` replaces
only what the caller recognises as its own output; and the half-written folders of a killed process are
removed by the next writer into the same parent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from diffship.errors import DiffshipError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: files at least this large have their sha256 remembered in the cache, by path, size, change time and inode
#: (as git's index does), so exporting a 33 GB model again does not read it all again first.
REMEMBERED_HASH_BYTES = 64 * 1024**2


def sha256_file_remembered(path: Path) -> str:
    """:func:`sha256_file`, remembered for large files until the file changes (size, mtime, inode)."""
    path = Path(path).resolve()
    stat = path.stat()
    if stat.st_size < REMEMBERED_HASH_BYTES:
        return sha256_file(path)
    store, key, stamp = cache_dir() / ".file-hashes.json", str(path), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    entry = _remembered(store).get(key, {})
    if entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = sha256_file(path)
    known = _remembered(store)  # again: another process may have added entries meanwhile
    known[key] = {"stamp": stamp, "sha256": digest}
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(store, json.dumps(known, indent=1) + "\n")  # readers in other processes see whole files
    except OSError:
        pass  # a read-only cache: the hash is still right, only not remembered
    return digest


def _remembered(store: Path) -> dict[str, Any]:
    try:
        known = read_json(store)
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


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


def atomic_write(path: Path, data: str | bytes | memoryview, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file.

    With ``replace=False`` an existing ``path`` is never replaced, not even by a racing writer (the file
    is linked into place, which fails if the name exists): :class:`FileExistsError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide reports from web servers and CI artifact uploads
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def png_bytes(image) -> bytes:
    """A PIL image encoded as PNG."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (or of the file) now; links are not followed, and files
    vanishing meanwhile (a writer renaming its working files) are skipped."""
    if Path(folder).is_file():
        return Path(folder).stat().st_size
    total = 0
    stack = [str(folder)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


def cache_dir() -> Path:
    """diffship's cache folder: ``$DIFFSHIP_CACHE``, else ``$XDG_CACHE_HOME/diffship``, else ``~/.cache/diffship``."""
    if env := os.environ.get("DIFFSHIP_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffship"


#: ``.<name>.partial-<pid>-<random>`` and ``.<name>.old-<pid>-<random>``: a writer's own folders.
_WORKING = re.compile(r"^\..+\.(partial|old)-(\d+)-[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_stale(parent: Path) -> list[Path]:
    """Remove the working folders in ``parent`` whose writing process is gone (killed); returns them."""
    removed = []
    for entry in parent.iterdir() if parent.is_dir() else ():
        match = _WORKING.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def _lock(final: Path, wait: bool) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``final`` exclusively: wait for it, or fail at once naming the holder."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the renames below still never replace a folder silently
        yield
        return
    path = final.with_name(f".{final.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DiffshipError(f"{final} is being written by another diffship process (pid {holder}); wait for "
                                f"it to finish, or write to another folder") from None
        # The previous holder may have removed the file between our open and our lock: lock the current one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def check_destination(final: Path, overwrite: bool = False, replaceable: Callable[[Path], bool] | None = None,
                      what: str = "diffship output") -> None:
    """Refuse a destination :func:`atomic_folder` would refuse, before any work: it exists (without
    ``overwrite``), it is not ``what`` (with it), or it cannot be created (a file or an unwritable folder
    in the way).

    Raises:
        DiffshipError: naming the path and what to do.
    """
    final = Path(final)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise DiffshipError(f"{final} already exists; remove it or pass --overwrite")
        empty = final.is_dir() and not final.is_symlink() and not any(final.iterdir())
        if not empty and not (final.is_dir() and not final.is_symlink() and replaceable and replaceable(final)):
            raise DiffshipError(f"{final} exists and is not a {what} (or an empty folder); --overwrite only "
                                f"replaces those: choose another output folder")
    check_writable(final)


def check_writable(path: Path, folder: bool = True) -> None:
    """Refuse, before any work, a path that cannot be written: a file where a folder is wanted (or the
    reverse), or a missing parent that cannot be created because a file or an unwritable folder is in
    the way.

    Raises:
        DiffshipError: naming the path and what blocks it.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise DiffshipError(f"{path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}; "
                            f"choose another path")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise DiffshipError(f"cannot write {path}: {ancestor} is not a folder this user can write to; choose "
                            f"another path")


@contextlib.contextmanager
def atomic_folder(final: Path, overwrite: bool = False, replaceable: Callable[[Path], bool] | None = None,
                  what: str = "diffship output", wait: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``final`` only if the block completes.

    Args:
        final: the folder to create.
        overwrite: replace an existing ``final`` -- only an empty folder, or one ``replaceable`` accepts.
        replaceable: whether an existing folder is the caller's own output (e.g. its manifest parses).
        what: what ``replaceable`` recognises, for messages.
        wait: wait for another process writing ``final`` instead of failing (caches: it then exists).

    An interrupted or failed write leaves ``final`` as it was (the folder it was to replace is put back);
    the temporary folder is removed, and is named ``.<name>.partial-<pid>-*`` so it is never mistaken
    for a result and a later writer can remove it if this process is killed.

    Raises:
        DiffshipError: ``final`` exists (without ``overwrite``), is not ``what`` (with it), or another
            process is writing it.
    """
    final = Path(final)
    check_destination(final, overwrite, replaceable, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final, wait):
        clean_stale(final.parent)
        check_destination(final, overwrite, replaceable, what)  # again: another process may have written it
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
        os.chmod(tmp, 0o755)
        old = None
        try:
            yield tmp
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
                final.rename(old / final.name)
            tmp.rename(final)
        except BaseException:
            if old is not None and not final.exists() and (old / final.name).exists():
                (old / final.name).rename(final)  # interrupted between the two renames: put it back
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def remove_folder(folder: Path) -> bool:
    """Remove ``folder`` as one step for readers: renamed aside (``.<name>.old-<pid>-*``), then deleted.

    Returns:
        False, removing nothing, when another process is writing ``folder`` (it holds its lock).
    """
    folder = Path(folder)
    try:
        with _lock(folder, wait=False):
            if not folder.is_dir():
                return False
            aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-{os.getpid()}-", dir=folder.parent))
            folder.rename(aside / folder.name)
    except DiffshipError:
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True

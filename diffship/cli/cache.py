"""``diffship cache list|prune``: what the diffship cache holds (presets, TensorRT's ONNX step, timing
caches), its sizes, and removing what is not needed."""

from __future__ import annotations

import re
import time

import typer
from rich.table import Table

from diffship.cli import app
from diffship.cli._common import out, plain
from diffship.errors import OptionError

cache_app = typer.Typer(no_args_is_help=True, help="List and prune the diffship cache ($DIFFSHIP_CACHE).")
app.add_typer(cache_app, name="cache")

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}


def parse_bytes(text: str) -> int:
    """``"20GB"``, ``"500 MB"``, ``"0"`` -> bytes (decimal units, as the sizes printed)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise OptionError(f"--max-size {text!r} is not a size; write e.g. 20GB, 500MB or 0")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _age(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days ago" if days >= 1 else f"{seconds / 3600:.1f} hours ago"


@cache_app.command("list")
def list_entries() -> None:
    """Every entry with its kind, size and last use (oldest first), and the total."""
    from diffship._cache import entries
    from diffship._files import cache_dir

    found = entries()
    now = time.time()
    table = Table("kind", "entry", "size", "last used")
    for e in found:
        table.add_row(e.kind, plain(e.name), _gb(e.size_bytes), _age(now - e.last_used))
    out.print(table)
    out.print(plain(f"{cache_dir()}: {len(found)} entries, {_gb(sum(e.size_bytes for e in found))}"))


@cache_app.command()
def prune(
    kind: list[str] = typer.Option([], "--kind", help="Only entries of this kind: preset, onnx, timing-cache (repeatable)."),
    older_than: float = typer.Option(None, "--older-than", min=0, help="Entries unused for more than this many days."),
    max_size: str = typer.Option(None, "--max-size", help="Remove the least recently used until the rest fit (e.g. 20GB)."),
    everything: bool = typer.Option(False, "--all", help="Every entry (of --kind, if given)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be removed; remove nothing."),
) -> None:
    """Remove cache entries: those unused for --older-than days, then the oldest beyond --max-size, or
    --all. Everything in the cache can be rebuilt; an entry another process is writing stays."""
    from diffship._cache import KINDS, entries, remove, select

    unknown = sorted(set(kind) - set(KINDS))
    if unknown:
        raise OptionError(f"--kind {', '.join(unknown)}: not a cache kind; choose from {', '.join(KINDS)}")
    if older_than is None and max_size is None and not everything:
        raise OptionError("say what to prune: --older-than DAYS, --max-size SIZE or --all (with --kind to narrow it)")
    limit = parse_bytes(max_size) if max_size is not None else None
    chosen = select(entries(), kinds=tuple(kind), older_than_days=older_than, max_bytes=limit)
    freed = 0
    for e in chosen:
        if dry_run or remove(e):
            freed += e.size_bytes
            out.print(plain(f"{'would remove' if dry_run else 'removed'} {e.kind} {e.name} ({_gb(e.size_bytes)})"))
        else:
            out.print(plain(f"kept {e.name}: another process is writing it"))
    out.print(plain(f"{'would free' if dry_run else 'freed'} {_gb(freed)} ({len(chosen)} entries)"))

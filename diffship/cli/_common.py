"""Pieces the commands share: size parsing, progress display, runtime options."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.text import Text


console = Console(stderr=True, highlight=False)
# Piped or captured output (CI logs) gets wide tables instead of truncated cells.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"512x768"`` -> ``(512, 768)`` (height x width), positive multiples of 8."""
    from diffship.configs.fields import parse_hw
    from diffship.reference.shapes import ShapeProfile

    if text is None:
        return None
    height, width = parse_hw(text)
    ShapeProfile(height=height, width=width).validate(8)
    return height, width


def plain(value: object) -> Text:
    """``value`` as plain text for rich: no markup is interpreted and control characters (terminal escape
    sequences) are shown as ``?``, so text from a file (a manifest) cannot restyle or take over the terminal."""
    return Text(re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", str(value)))


def component_summary(folder: Path, entry) -> tuple[str, str]:
    """A manifest component's precision (with any fp32 fallback) and its size on disk, for tables (with the
    package another tool's layout keeps outside the component folder: Apple's)."""
    size = sum((folder / f).stat().st_size for f in entry.files)
    if package := getattr(entry.details, "package", None):
        size += sum(p.stat().st_size for p in (folder.parent / package).rglob("*") if p.is_file())
    fallback = " (fp32 fallback)" if entry.details.fp32_fallback else ""
    return entry.precision + fallback, f"{size / 1e6:.1f} MB"


@contextlib.contextmanager
def steps(title: str) -> Iterator:
    """A live status line; each call of the yielded function closes the previous step with its time."""
    state = {"name": None, "start": time.perf_counter()}

    def close() -> None:
        if state["name"]:
            console.print(f"  [green]✓[/] {state['name']} [dim]({time.perf_counter() - state['start']:.1f}s)[/]")

    with console.status(title) as status:
        def say(message: str) -> None:
            close()
            state["name"], state["start"] = message, time.perf_counter()
            status.update(f"{message}…")

        def detail(text: str) -> None:  # the current step's progress, from a watcher thread
            if state["name"]:
                status.update(f"{state['name']}… {text}")

        say.detail = detail
        yield say
        close()


def parse_options(pairs: list[str] | None) -> dict:
    """``["threads=4", "session_config={\"a\": \"0\"}"]`` -> dict; values are JSON where they parse."""
    import json

    from diffship.errors import DiffshipError

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DiffshipError(f"option {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def runtime_options(device: str | None, threads: int | None, pairs: list[str] | None = None) -> dict:
    """Runner options from the common flags plus ``--option KEY=VALUE`` pairs."""
    options = parse_options(pairs)
    if device:
        options["device"] = device.split(",") if "," in device else device
    if threads:
        options["threads"] = threads
    return options

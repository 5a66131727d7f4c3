"""How long-running steps report what they are doing: a callable taking one line of text.

Exports, parity checks and packaging call it before each step; the CLI draws a status line from it.
A callable may also have a ``detail`` attribute (a callable taking text): it then receives updates of
the current step (time so far, bytes written) without a new step beginning; see :func:`watch_folder`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from diffship._files import folder_bytes

#: called with a line of text ("exporting unet (onnx, fp32)") before each step.
Progress = Callable[[str], None]


def silent(_message: str) -> None:
    """A :data:`Progress` that reports nothing (the default of library calls)."""



def detail(progress: Progress, text: str) -> None:
    """Update the current step of ``progress`` with ``text``, where it takes updates (its ``detail``)."""
    update = getattr(progress, "detail", None)
    if update is not None:
        update(text)


@contextlib.contextmanager
def watch_folder(folder: Path, progress: Progress, every: float = 2.0) -> Iterator[None]:
    """While the block runs, update the current step every ``every`` seconds with the time it has taken
    and the bytes written under ``folder`` so far ("95 s, 3.21 GB written"), from a watcher thread: a
    large component's export runs for minutes between two steps. Nothing runs where ``progress`` takes
    no updates."""
    if getattr(progress, "detail", None) is None:
        yield
        return
    done = threading.Event()
    start = time.perf_counter()

    def watch() -> None:
        while not done.wait(every):
            written = folder_bytes(Path(folder))
            detail(progress, f"{time.perf_counter() - start:.0f} s" + (f", {written / 1e9:.2f} GB written" if written else ""))

    thread = threading.Thread(target=watch, name="diffship-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()

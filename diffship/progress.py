"""How long-running steps report what they are doing: a callable taking one line of text.

Exports, parity checks and packaging call it before each step; the CLI draws a status line from it.
"""

from __future__ import annotations

from typing import Callable

#: called with a line of text ("exporting unet (onnx, fp32)") before each step.
Progress = Callable[[str], None]


def silent(_message: str) -> None:
    """A :data:`Progress` that reports nothing (the default of library calls)."""


"""The ``diffship`` command line: one module per command group, one line per error."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback
from typing import Any

import click
import typer

from diffship.errors import DiffshipError, Terminated, first_line

app = typer.Typer(
    name="diffship", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Export diffusers pipelines (ONNX, OpenVINO, Core ML, TensorRT), run them like diffusers, and prove parity with PyTorch.",
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Full tracebacks and library logs.")) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Library progress bars and notices would drown our one-line messages."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # converters' pass-by-pass progress bars (coremltools)
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "torch", "onnxscript", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


from diffship.cli import adopt, bench, cache, demo, export, generate, inspect, package, parity, tune  # noqa: E402  (commands register on `app`)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Every failure prints one line (the traceback with --debug):
    1 parity outside tolerance, 2 bad input or environment, 3 an internal error, 130 Ctrl-C, 143 SIGTERM."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    on_term = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(args=args, prog_name="diffship", standalone_mode=False)
    except _EXIT as exc:
        code = exc.exit_code
    except _USAGE as exc:  # an unknown flag, a missing argument, a value out of range
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"diffship: error: {first_line(Exception(message))} (see: diffship {_command(args)}--help)",
              file=sys.stderr)
        return 2
    except _ABORT + (KeyboardInterrupt,):
        code = INTERRUPTED
    except Terminated:
        print("diffship: terminated; nothing half-written was kept", file=sys.stderr)
        return TERMINATED
    except DiffshipError as exc:
        if debug:
            traceback.print_exc()
        print(f"diffship: error: {_one_line(exc, debug)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the environment: a path that cannot be written, a full disk, a missing folder
        if debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"diffship: error: {exc.strerror or first_line(exc)}{where}; check the path, its permissions and "
              f"free disk space", file=sys.stderr)
        return 2
    except Exception as exc:  # anything unexpected still gets one line, and the way to see more
        if debug:
            traceback.print_exc()
        print(f"diffship: error: unexpected {type(exc).__name__}: {_one_line(exc, True)} "
              f"(re-run with --debug for the traceback)", file=sys.stderr)
        return UNEXPECTED_EXIT
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)
    if code == INTERRUPTED:  # typer turns Ctrl-C into this exit code, after everything unwound
        print("diffship: interrupted; nothing half-written was kept", file=sys.stderr)
    return code if isinstance(code, int) else 0


#: exit code of an unexpected internal error, distinct from parity failures (1) and diffship errors (2).
UNEXPECTED_EXIT = 3
#: exit codes of Ctrl-C and SIGTERM, as shells report a process ended by those signals.
INTERRUPTED, TERMINATED = 130, 143
#: typer >= 0.20 raises its own copies of click's exceptions; older typer raises click's.
_USAGE = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _command(args: list[str]) -> str:
    """The command word of ``args`` followed by a space (for the --help hint), or nothing."""
    words = [a for a in args if not a.startswith("-")]
    return f"{words[0]} " if words else ""


def _one_line(exc: BaseException, quiet_hint: bool) -> str:
    """The first line of a message; library text embedded in it may span several."""
    more = "" if quiet_hint or len(str(exc).strip().splitlines()) <= 1 else " (more with --debug)"
    return first_line(exc) + more


__all__ = ["app", "bench", "demo", "export", "generate", "inspect", "main", "package", "parity", "tune"]

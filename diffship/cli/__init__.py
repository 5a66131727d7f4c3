"""The ``diffship`` command line: one module per command group, one line per error."""

from __future__ import annotations

import logging
import sys
import traceback

import click
import typer

from diffship.errors import DiffshipError, first_line

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


from diffship.cli import bench, demo, export, generate, inspect, package, parity  # noqa: E402  (commands register on `app`)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. DiffshipErrors print one line (traceback with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="diffship", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("diffship: interrupted", file=sys.stderr)
        return 130
    except DiffshipError as exc:
        if debug:
            traceback.print_exc()
        print(f"diffship: error: {_one_line(exc, debug)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # anything unexpected still gets one line, and the way to see more
        if debug:
            traceback.print_exc()
        print(f"diffship: error: unexpected {type(exc).__name__}: {_one_line(exc, True)} "
              f"(re-run with --debug for the traceback)", file=sys.stderr)
        return UNEXPECTED_EXIT
    return 0


#: exit code of an unexpected internal error, distinct from parity failures (1) and diffship errors (2).
UNEXPECTED_EXIT = 3


def _one_line(exc: BaseException, quiet_hint: bool) -> str:
    """The first line of a message; library text embedded in it may span several."""
    more = "" if quiet_hint or len(str(exc).strip().splitlines()) <= 1 else " (more with --debug)"
    return first_line(exc) + more


__all__ = ["app", "bench", "demo", "export", "generate", "inspect", "main", "package", "parity"]

"""Run crash-prone native steps (model checkers, engine builders) in a child process.

A segfault or abort in native code then becomes an ordinary :class:`~diffship.errors.DiffshipError`
naming the step, instead of killing the CLI with no message. The child is a fresh interpreter
(``python -m diffship._isolate``), so it works from scripts and notebooks without a ``__main__`` guard.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from diffship.errors import DiffshipError

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def run_isolated(step: str, fn: Callable[..., Any], *args: Any, error: type[DiffshipError] = DiffshipError,
                 **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` in a child interpreter and return its result.

    Args:
        step: what the call does, for the error message ("checking unet/model.onnx").
        fn: a module-level function; arguments and result must pickle.
        error: the exception type raised when the child dies.

    Exceptions raised by ``fn`` are re-raised here as they are.
    """
    with tempfile.TemporaryDirectory(prefix="diffship-isolate-") as tmp:
        call, result = Path(tmp) / "call.pkl", Path(tmp) / "result.pkl"
        call.write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, args, kwargs)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-m", "diffship._isolate", str(call), str(result)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not result.is_file():
            code = proc.returncode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise error(f"{step} crashed ({how}: {tail}); re-run with --debug, and check free memory")
        ok, value, peak = pickle.loads(result.read_bytes())
    global _largest_child
    _largest_child = max(_largest_child, peak or 0)
    if ok:
        return value
    raise value


#: the largest peak resident memory of a child this process ran, as the child measured it itself.
_largest_child = 0


def largest_child_rss_bytes() -> int:
    """The peak resident memory of the largest child :func:`run_isolated` ran (0 if none, or unknown), as
    measured in the child (``VmHWM``): the kernel's ``ru_maxrss`` of a child also counts what its parent
    held when it forked it."""
    return _largest_child


def own_peak_rss_bytes() -> int | None:
    """This process's peak resident memory since it started (``VmHWM``, Linux), else None. Unlike
    ``getrusage``'s ``ru_maxrss``, which keeps across ``exec`` the peak of the parent that forked it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _child(call: str, result: str) -> None:
    module, qualname, args, kwargs = pickle.loads(Path(call).read_bytes())
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    try:
        outcome = (True, fn(*args, **kwargs))
    except Exception as exc:  # handed back to the parent, which re-raises it
        outcome = (False, exc)
    Path(result).write_bytes(pickle.dumps((*outcome, own_peak_rss_bytes())))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])

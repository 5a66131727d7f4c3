"""The worker pool: one process per subject, numbered requests, and interleaved timed rounds.

Each subject lives in its own process (:mod:`diffship.bench.worker`) so its peak memory is its own, a crash
or an out-of-memory kill costs only that subject, and subjects cannot share caches or thread pools. The
coordinator asks the subjects for one timed call at a time, in turn (:func:`rounds`), so every subject sees
the same machine conditions.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Iterator

from diffship.bench.worker import serve


class Worker:
    """A subject's process and the pipe to it. Requests are numbered and replies carry the number, so a
    reply left over from an interrupted request is never taken for the next one's."""

    def __init__(self, planned: Any, settings: dict[str, Any]):
        ctx = multiprocessing.get_context("spawn")
        self.planned = planned
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, planned.subject, settings), name=planned.subject.name)
        self.proc.start()
        child.close()
        self.sent = 0  # the load reply is number 0

    @property
    def name(self) -> str:
        return self.planned.subject.name

    def reply(self) -> tuple[str, Any]:
        try:
            while True:
                number, status, value = self.conn.recv()
                if number == self.sent:
                    return status, value
        except (EOFError, OSError):
            self.proc.join(10)
            code = self.proc.exitcode
            why = "killed (SIGKILL), most likely out of memory" if code == -9 else f"exit code {code}"
            return "died", f"worker process ended: {why}"

    def request(self, *message: Any) -> tuple[str, Any]:
        self.sent += 1
        try:
            self.conn.send((self.sent, *message))
        except (OSError, ValueError):
            return "died", "worker process is gone"
        return self.reply()

    def stop(self) -> dict[str, Any] | None:
        """Ask for the worker's memory figures and end it (killed if it does not end by itself)."""
        status, value = self.request("stop") if self.proc.is_alive() else ("died", None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        return value if status == "ok" else None


def rounds(workers: list[Worker], repeats: int) -> Iterator[tuple[int, Worker]]:
    """Each round every worker once; the order rotates so no subject always runs right after another."""
    for r in range(repeats):
        k = r % max(len(workers), 1)
        for w in workers[k:] + workers[:k]:
            yield r, w


def series(workers: list[Worker], message: Callable[[bool], tuple], warmup: int, repeats: int,
           dead: Callable[[Worker, str], None]) -> dict[str, dict[str, Any]]:
    """Warm-up calls, then ``repeats`` interleaved timed calls; per worker its times, each timed call's
    per-component split where it reports one (``parts``), the last call's kept values, and a skip reason if
    it cannot take the request."""
    found: dict[str, dict[str, Any]] = {w.name: {"seconds": [], "first": None, "kept": None, "skipped": None,
                                                 "parts": []} for w in workers}
    active = list(workers)

    def call(w: Worker, keep: bool) -> dict[str, Any] | None:
        status, value = w.request(*message(keep))
        if status == "ok":
            return value
        if status == "died":
            dead(w, value)
            found[w.name]["skipped"] = f"error: {value}"
        else:
            found[w.name]["skipped"] = value if status == "skip" else f"error: {value}"
        active.remove(w)
        return None

    for w in list(active):
        for i in range(warmup):
            value = call(w, False)
            if value is None:
                break
            if i == 0:
                found[w.name]["first"] = _seconds(value)[0]
    for r, w in rounds(list(active), repeats):
        if w not in active:
            continue
        value = call(w, r == repeats - 1)
        if value is not None:
            found[w.name]["seconds"] += _seconds(value)
            if "component_seconds" in value:
                found[w.name]["parts"].append(value["component_seconds"])
            if r == repeats - 1:
                found[w.name]["kept"] = value
            if found[w.name]["first"] is None:
                found[w.name]["first"] = _seconds(value)[0]
    return found


def _seconds(value: dict[str, Any]) -> list[float]:
    s = value["seconds"]
    return list(s) if isinstance(s, list) else [s]

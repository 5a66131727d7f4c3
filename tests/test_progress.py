"""Progress of long steps: a large component's export reports its time and the bytes written so far."""

from __future__ import annotations

import time

from diffship.progress import detail, watch_folder


class Recorder:
    def __init__(self):
        self.steps, self.details = [], []

    def __call__(self, message: str) -> None:
        self.steps.append(message)

    def detail(self, text: str) -> None:
        self.details.append(text)


def test_the_watcher_reports_time_and_bytes_written(tmp_path):
    progress = Recorder()
    with watch_folder(tmp_path / "unet", progress, every=0.02):
        time.sleep(0.1)  # nothing written yet: time only
        (tmp_path / "unet").mkdir()
        (tmp_path / "unet" / "model.onnx.data").write_bytes(b"x" * 30_000_000)
        time.sleep(0.1)
    assert progress.details and progress.details[0].endswith(" s")
    assert progress.details[-1].endswith(", 0.03 GB written")
    assert progress.steps == []  # updates of the current step, never new steps
    count = len(progress.details)
    time.sleep(0.1)
    assert len(progress.details) == count  # the watcher stopped with the block


def test_a_plain_callable_gets_steps_only(tmp_path):
    seen = []
    with watch_folder(tmp_path, seen.append, every=0.01):
        time.sleep(0.05)
    detail(seen.append, "ignored")
    assert seen == []

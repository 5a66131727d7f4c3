"""Memory facts a streamed export relies on."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import sys
import numpy as np
from diffship.reference.memory import return_large_frees
if sys.argv[1] == "fixed" and not return_large_frees():
    print("unsupported"); raise SystemExit
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
big = np.ones(30 << 20, dtype=np.uint8); del big  # freeing a mapped block raises glibc's threshold (to <= 32 MB)
blocks = [np.ones(20 << 20, dtype=np.uint8) for _ in range(40)]  # 800 MB, one weight after another
before = rss()
del blocks[:-1]  # all but the newest dropped
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_weights_dropped_one_after_another_go_back_to_the_os():
    freed = {}
    for mode in ("default", "fixed"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
        if out.strip() == "unsupported":
            pytest.skip("this C library has no mallopt (not glibc)")
        freed[mode] = int(out)
    assert freed["fixed"] > 700  # MB: the dropped blocks left the process
    assert freed["default"] < 100  # without it, glibc kept them in its heap


@pytest.mark.onnx
def test_processes_that_only_export_return_freed_blocks_and_the_library_leaves_the_allocator(monkeypatch, tmp_path):
    """``diffship export`` sets it for its process; ``export_pipeline`` alone (a user's process) does not."""
    from diffship.cli import main
    from diffship.reference import memory
    from diffship.workflows import export_pipeline

    calls = []
    monkeypatch.setattr(memory, "return_large_frees", lambda: calls.append(1) or True)
    export_pipeline("tiny", tmp_path / "library", backend="onnx", components=["vae_decoder"])
    assert calls == []
    assert main(["export", "tiny", str(tmp_path / "cli"), "--backend", "onnx", "--component", "vae_decoder"]) == 0
    assert calls == [1]

"""The diffship cache: entries listed with kinds and sizes, pruning by age and size, the ONNX cache's cap,
and `diffship cache list|prune`. Entries are made by hand (no exports): sizes and ages are what counts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from diffship import _cache
from diffship.cli import main

DAY = 86400


def _entry(root: Path, kind: str, name: str, size: int, age_days: float) -> Path:
    """A cache entry of ``size`` bytes last used ``age_days`` ago."""
    if kind == "preset":
        path = root / name
        path.mkdir(parents=True)
        (path / "model_index.json").write_text("{}")
        (path / "weights").write_bytes(b"w" * (size - 2))
    elif kind == "onnx":
        path = root / "onnx" / name
        path.mkdir(parents=True)
        (path / "artifact.json").write_text("{}")
        (path / "model.onnx").write_bytes(b"o" * (size - 2))
    else:
        path = root / "tensorrt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"t" * size)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DIFFSHIP_CACHE", str(root))
    _entry(root, "preset", "tiny-v2", 1000, 40)
    _entry(root, "onnx", "unet-fp32-aaa", 3000, 10)
    _entry(root, "onnx", "unet-fp16-bbb", 2000, 2)
    _entry(root, "timing-cache", "tensorrt-10-gpu.timing.cache", 500, 1)
    # not entries: a writer's working folder, a lock, an ONNX folder without its artifact record, a stray file
    (root / "onnx" / ".unet-fp32-ccc.partial-1-x").mkdir()
    (root / ".tiny-v2.lock").write_text("")
    (root / "onnx" / "half-written").mkdir()
    (root / "notes.txt").write_text("mine")
    return root


def test_entries_have_kinds_sizes_and_ages_oldest_first(cache):
    found = _cache.entries()
    assert [(e.kind, e.name, e.size_bytes) for e in found] == [
        ("preset", "tiny-v2", 1000), ("onnx", "onnx/unet-fp32-aaa", 3000), ("onnx", "onnx/unet-fp16-bbb", 2000),
        ("timing-cache", "tensorrt/tensorrt-10-gpu.timing.cache", 500)]


def test_select_by_age_then_size_oldest_first(cache):
    found = _cache.entries()
    names = lambda chosen: [e.name for e in chosen]  # noqa: E731
    assert names(_cache.select(found, older_than_days=5)) == ["tiny-v2", "onnx/unet-fp32-aaa"]
    # 6500 bytes in all: the oldest go until the rest fit in 3000
    assert names(_cache.select(found, max_bytes=3000)) == ["tiny-v2", "onnx/unet-fp32-aaa"]
    assert names(_cache.select(found, max_bytes=6500)) == []
    assert names(_cache.select(found, kinds=("onnx",), max_bytes=2500)) == ["onnx/unet-fp32-aaa"]
    assert names(_cache.select(found, kinds=("timing-cache",))) == ["tensorrt/tensorrt-10-gpu.timing.cache"]


def test_the_cap_keeps_the_new_entry_and_those_in_use(cache):
    new = _entry(cache, "onnx", "vae-fp32-ddd", 4000, 0)
    removed = _cache.enforce_cap("onnx", 6000, keep=new)
    assert [e.name for e in removed] == ["onnx/unet-fp32-aaa"]  # 9000 -> 6000: the oldest goes
    assert new.is_dir() and (cache / "onnx" / "unet-fp16-bbb").is_dir() and (cache / "tiny-v2").is_dir()
    # over the cap with only the new entry and one used a minute ago: both stay
    recent = _entry(cache, "onnx", "te-fp32-eee", 3000, 60 / DAY)
    assert [e.name for e in _cache.enforce_cap("onnx", 1000, keep=new)] == ["onnx/unet-fp16-bbb"]
    assert recent.is_dir() and new.is_dir()


def test_an_entry_being_written_is_not_removed(cache):
    from diffship._files import atomic_folder

    target = cache / "onnx" / "unet-fp32-aaa"
    entry = next(e for e in _cache.entries() if e.path == target)
    with atomic_folder(cache / "onnx" / "unet-fp32-aaa", overwrite=True, replaceable=lambda p: True):
        assert not _cache.remove(entry)  # its writer holds the lock
    assert _cache.remove(entry) and not target.exists()


def test_cli_lists_and_prunes(cache, capsys):
    assert main(["cache", "list"]) == 0
    printed = capsys.readouterr().out
    assert "tiny-v2" in printed and "onnx/unet-fp16-bbb" in printed and "4 entries" in printed
    assert main(["cache", "prune", "--older-than", "5", "--dry-run"]) == 0
    assert "would remove preset tiny-v2" in capsys.readouterr().out and (cache / "tiny-v2").is_dir()
    assert main(["cache", "prune", "--kind", "onnx", "--max-size", "2.5kb"]) == 0
    printed = capsys.readouterr().out
    assert "removed onnx onnx/unet-fp32-aaa" in printed and "freed" in printed
    assert not (cache / "onnx" / "unet-fp32-aaa").exists() and (cache / "onnx" / "unet-fp16-bbb").is_dir()
    assert main(["cache", "prune", "--all"]) == 0
    assert _cache.entries() == [] and (cache / "notes.txt").is_file()  # only what diffship wrote goes


@pytest.mark.parametrize("args, message", [
    (["prune"], "say what to prune"),
    (["prune", "--max-size", "lots"], "is not a size"),
    (["prune", "--kind", "weights", "--all"], "not a cache kind"),
])
def test_cli_refusals_are_one_line(cache, capsys, args, message):
    assert main(["cache", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert len(_cache.entries()) == 4


def test_large_file_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """Fingerprinting a source hashes its files; a large file is read once, then again only when it changes."""
    import os

    from diffship import _files

    monkeypatch.setenv("DIFFSHIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_files, "REMEMBERED_HASH_BYTES", 4)
    reads = []
    sha256_file = _files.sha256_file
    monkeypatch.setattr(_files, "sha256_file", lambda p: reads.append(p) or sha256_file(p))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"first version")
    first = _files.sha256_file_remembered(weights)
    assert _files.sha256_file_remembered(weights) == first and len(reads) == 1
    weights.write_bytes(b"second version")
    os.utime(weights, ns=(1, 1))  # even a changed file with an old time: its size differs
    assert _files.sha256_file_remembered(weights) == sha256_file(weights) != first
    assert len(reads) == 2
    small = tmp_path / "config.json"
    small.write_bytes(b"{}")  # under the threshold: always hashed
    _files.sha256_file_remembered(small), _files.sha256_file_remembered(small)
    assert len(reads) == 4

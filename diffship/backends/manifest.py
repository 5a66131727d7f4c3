"""The export manifest ``diffship.json`` as typed records: what was exported, from what, with which libraries.

Written last, after every other file, so a folder without it is never a finished export. It records the
sha256 of every file; :func:`read_manifest` refuses a folder whose files changed, and validates every
key (each component's ``details`` against its backend's record) when it reads one.

Schema (``format: diffship.export/1``)::

    format, diffship_version, created (ISO time)
    backend, precision, family, pipeline_class
    tasks: the pipeline tasks this export can run (text2img, img2img, inpaint)
    source: {name, kind, path, pipeline_class, fingerprint}
    shapes: {static: bool, profile: {batch_size, height, width, sequence_length, guidance}}
    components: {<name>: {component, source, precision, files, inputs, outputs, details}}
        inputs / outputs: [{name, dtype, dims}] (dims: ints, or the names of symbolic dims)
        details: the backend's record (e.g. OnnxDetails: opset, external_data; fp32_fallback)
    versions: {python, torch, diffusers, transformers, <backend libraries>}
    runtime: the runtime options the export runs with unless the caller gives others (a plain export: its
        backend's defaults; ``diffship tune``: the settings it chose), validated by the backend's record
    files: {<relative path>: <sha256>}   # every file but diffship.json
    origin: diffship, or the tool that wrote a folder `diffship adopt` took in (optimum-onnx, optimum-intel)
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from diffship._files import read_json, sha256_file, write_json
from diffship.configs.fields import parse, to_data
from diffship.errors import DiffshipError, ExportedModelError
from diffship.reference.loader import SourceInfo
from diffship.reference.shapes import ShapeProfile
from diffship.reference.specs import IONames

MANIFEST = "diffship.json"
FORMAT = "diffship.export/1"


@dataclass(frozen=True)
class TensorIO:
    """One input or output of an exported component.

    Attributes:
        name: its name in the exported model (optimum's IO names).
        dtype: numpy's name of its dtype (``float32``, ``float16``, ``int64``).
        dims: per axis a fixed size, or the name of a symbolic dim (``batch``, ``latent_height``...).
    """

    name: str
    dtype: str
    dims: list[int | str]


@dataclass(frozen=True)
class ComponentEntry(IONames):
    """What an exporter wrote for one component.

    Attributes:
        component: the component's name (``unet``, ``vae_decoder``...).
        source: the pipeline attribute it was exported from (``unet``, ``vae``).
        precision: the precision it was exported in (``fp32`` where a reduced precision fell back).
        files: files written, relative to the component folder.
        inputs / outputs: its IO (:class:`TensorIO`).
        details: the backend's record of facts about it (``Backend.details``).
    """

    component: str
    source: str
    precision: str
    files: list[str]
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]
    details: Any


@dataclass(frozen=True)
class Shapes:
    """The shapes an export was made for.

    Attributes:
        static: whether its dims are fixed at ``profile`` (``--static``) instead of symbolic.
        profile: the request shape it was traced (and, when static, fixed) at.
    """

    static: bool
    profile: ShapeProfile


@dataclass(frozen=True)
class Manifest:
    """The manifest of one export (see the module docstring for its JSON form).

    ``runtime`` holds the runtime options loads use by default (see the module docstring).
    ``origin`` is ``diffship``, or for a folder another tool wrote that tool: ``optimum-onnx``,
    ``optimum-intel``. Read by :func:`diffship.backends.foreign.foreign_manifest`, such a manifest has no
    file hashes, so nothing about its files is verified; ``diffship adopt`` writes it with them.
    """

    backend: str
    precision: str
    family: str
    pipeline_class: str
    tasks: list[str]
    source: SourceInfo
    shapes: Shapes
    components: dict[str, ComponentEntry]
    versions: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)
    origin: str = "diffship"
    runtime: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    diffship_version: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (optional facts that were not recorded are left out of ``details``)."""
        data = to_data(self)
        for name, entry in self.components.items():
            data["components"][name]["details"] = to_data(entry.details, drop_none=True)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Manifest":
        """Validate and type a manifest's JSON form (each component's details by its backend's record).

        Raises:
            ExportedModelError: naming ``where`` and the first key that is missing, unknown or malformed.
        """
        from diffship.backends import get

        manifest = parse(cls, data, "manifest key", where=where, error=ExportedModelError)
        paths = [*manifest.files] + [f"{name}/{f}" for name, e in manifest.components.items() for f in e.files]
        if unsafe := next((p for p in paths if not inside(p)), None):
            raise ExportedModelError(f"{where}: the path {unsafe!r} leaves the export folder; refusing this manifest")
        try:
            backend = get(manifest.backend)
        except DiffshipError as exc:
            raise ExportedModelError(f"{where}: {exc}; it was written by another diffship: re-export") from None
        components = {}
        for name, entry in manifest.components.items():
            components[name] = replace(entry, details=backend.parse_details(entry.details, f"{where}: {name}"))
        try:
            backend.parse_runtime_options(manifest.runtime)
        except DiffshipError as exc:
            raise ExportedModelError(f"{where}: runtime: {exc}; re-export, or edit its runtime settings") from None
        return replace(manifest, components=components)

    def runtime_options(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """The runtime options a load of this export runs with: its recorded ``runtime`` settings, with the
        ``given`` ones (the caller's) winning."""
        return {**self.runtime, **(given or {})}

    def completed(self, folder: Path) -> "Manifest":
        """The manifest with format, version, time and the sha256 of every file in ``folder``."""
        from diffship import __version__

        return replace(self, format=FORMAT, diffship_version=__version__,
                       created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       files=file_hashes(folder))

    def write(self, folder: Path) -> "Manifest":
        """Complete the manifest (:meth:`completed`) and write it into ``folder`` (last, so a folder
        without it is never a finished export)."""
        done = self.completed(folder)
        write_json(folder / MANIFEST, done.to_dict())
        return done


def library_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Versions of diffship, Python and the libraries every export depends on, plus ``extra``."""
    import diffusers
    import torch
    import transformers

    from diffship import __version__

    return {"diffship": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, **(extra or {})}


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` except the manifest, by relative POSIX path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def inside(rel: str) -> bool:
    """Whether ``rel`` is a plain relative POSIX path that stays inside its folder (no ``..``, not absolute)."""
    path = PurePosixPath(rel)
    return (bool(rel) and "\\" not in rel and not path.is_absolute() and path.as_posix() == rel
            and all(part not in ("..", ".") for part in path.parts))


def present_files(folder: Path) -> set[str]:
    """Every file below ``folder`` but the manifest, by relative POSIX path.

    Raises:
        ExportedModelError: a symbolic link (an export holds only its own files; a link could point anywhere).
    """
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            path = Path(root) / name
            if path.is_symlink():
                raise ExportedModelError(f"{folder}: {path.relative_to(folder).as_posix()} is a symbolic link; an "
                                         f"export holds only its own files: remove it or re-run diffship export")
        found.update((Path(root) / name).relative_to(folder).as_posix() for name in files)
    found.discard(MANIFEST)
    return found


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Raise :class:`ExportedModelError` unless the folder holds exactly the files its manifest lists (no
    more, no fewer, no links), every component's files among them, each with its recorded sha256."""
    listed = set(manifest.files)
    unlisted = sorted(present_files(folder) - listed)
    if unlisted:
        raise ExportedModelError(f"{folder}: {unlisted[0]} is not listed in {MANIFEST} (added after the export?); "
                                 f"remove it or re-run diffship export")
    for name, entry in manifest.components.items():
        if stray := next((f for f in entry.files if f"{name}/{f}" not in listed), None):
            raise ExportedModelError(f"{folder}: {name}/{stray} is a file of {name} but {MANIFEST} does not list it; "
                                     f"re-run diffship export")
    for rel, digest in manifest.files.items():
        path = folder / rel
        if not path.is_file():
            raise ExportedModelError(f"{folder}: {rel} is missing; the export is incomplete, re-run diffship export")
        if sha256_file(path) != digest:
            raise ExportedModelError(
                f"{folder}: {rel} does not match the sha256 in {MANIFEST} (modified or corrupted); re-run diffship export"
            )


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read, validate and (by default) verify the manifest of an exported folder.

    Raises:
        ExportedModelError: no such folder, no manifest (not an export, or an interrupted one; an
            optimum export is read by :func:`~diffship.backends.foreign.foreign_manifest`), an unknown format, missing or malformed keys, or files that do not match their recorded sha256.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportedModelError(f"{folder}: no such folder; export one with: diffship export SOURCE {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        from diffship.backends.foreign import foreign_manifest

        foreign = foreign_manifest(folder)
        if foreign is not None:
            return foreign
        raise ExportedModelError(
            f"{folder} is not a diffship export (no {MANIFEST}); it may be an unfinished export: re-run diffship export"
        )
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ExportedModelError(f"{path} is not valid JSON ({exc}); re-run diffship export") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ExportedModelError(f"{path} has format {found!r}, expected {FORMAT!r}; re-export")
    missing = [f for f in ("backend", "precision", "family", "pipeline_class", "tasks", "source", "shapes",
                           "components", "versions", "files") if f not in data]
    if missing:
        raise ExportedModelError(f"{path} lacks {', '.join(missing)} (written by an older diffship?); re-export")
    manifest = Manifest.from_dict(data, str(path))
    if verify:
        verify_files(folder, manifest)
    return manifest

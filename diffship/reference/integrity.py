"""What a diffusers folder must be before it is exported: the classes its family expects, and weight files
that fit those modules exactly.

Loading alone does not prove it: transformers and diffusers initialise missing weights randomly and report
it only in a log line, and a ``model_index.json`` may name another architecture than the family's. An
export made from such a source would be wrong with exit code 0, so both are refused here, naming the
first keys, before anything is exported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from diffship.errors import SourceError

#: diffusers renames these attention weights of older checkpoints when it loads them.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
#: weight files the loaders read, in their order of preference (no variants: diffship loads none).
_WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
_SHOWN = 3


def check_classes(folder: Path, index: dict[str, Any], family: Any) -> None:
    """Refuse a folder whose ``model_index.json`` names another class for a module than its family's
    (a ``text_encoder`` of another architecture), or library components the family does not take.

    Raises:
        SourceError: naming the module, the class found and the class expected.
    """
    for name, (library, class_name) in family.modules.items():
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:  # absent (the SDXL refiner's text encoder)
            continue
        if list(entry) != [library, class_name]:
            raise SourceError(f"{folder}: {name} is {'.'.join(map(str, entry))} in model_index.json, but a "
                              f"{family.name} pipeline's {name} is a {library}.{class_name}; diffship exports only "
                              f"the architectures it knows")
    for name, entry in index.items():
        if name in family.library and isinstance(entry, list) and entry[0] is not None:
            try:
                family.component_class(name, entry)
            except SourceError as exc:
                raise SourceError(f"{folder}: {exc}") from None


def check_weights(folder: Path, pipe: Any, family: Any) -> None:
    """Refuse a folder whose weight files do not fit the loaded modules: keys the module has and the files
    lack (they would be initialised randomly), keys the files have and the module does not take, and
    tensors of another shape. Only safetensors files are read (their headers: no weights are loaded).

    Raises:
        SourceError: naming the module and its first missing, unexpected or mis-shaped keys.
    """
    for name in family.modules:
        module = getattr(pipe, name, None)
        files = _weight_files(folder / name)
        if module is None or not files:
            continue
        stored = _stored_shapes(files, diffusers=type(module).__module__.startswith("diffusers"))
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if not type(module).__module__.startswith("diffusers"):
            stored = _prefixes_resolved(stored, expected, module)
        missing = [k for k in expected if k not in stored and not _ignored(module, k, "missing")]
        unexpected = [k for k in stored if k not in expected and not _ignored(module, k, "unexpected")]
        shaped = [f"{k} {stored[k]} (the model has {expected[k]})" for k in expected
                  if k in stored and stored[k] != expected[k]]
        problems = [f"{what}: {', '.join(keys[:_SHOWN])}" + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")
                    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped))
                    if keys]
        if problems:
            raise SourceError(f"{folder / name}: the weights do not fit its {type(module).__name__} ({'; '.join(problems)}); "
                              f"a missing weight would be exported randomly initialised: re-save the pipeline")


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a loader reads for one module: a sharded index's shards, or the one file."""
    for name in _WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    return []


def _stored_shapes(files: list[Path], diffusers: bool) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[_renamed(key) if diffusers else key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _prefixes_resolved(stored: dict[str, Any], expected: dict[str, Any], module: Any) -> dict[str, Any]:
    """Stored keys as transformers maps them: with or without the model's prefix (``text_model.``, the
    layout of Stable Diffusion's CLIP checkpoints and of transformers 4, which transformers 5 reads
    though it saves the keys without it)."""
    prefixes = {p for p in (getattr(module, "base_model_prefix", ""), "text_model") if p}
    resolved = {}
    for key, shape in stored.items():
        if key not in expected:
            candidates = [key[len(p) + 1:] for p in prefixes if key.startswith(p + ".")]
            candidates += [f"{p}.{key}" for p in prefixes]
            key = next((c for c in candidates if c in expected), key)
        resolved[key] = shape
    return resolved


def _renamed(key: str) -> str:
    """An older diffusers attention key as diffusers loads it (``...attentions.0.query.weight`` -> ``to_q``)."""
    parts = key.rsplit(".", 2)
    if len(parts) == 3 and parts[1] in _DEPRECATED_ATTENTION:
        return f"{parts[0]}.{_DEPRECATED_ATTENTION[parts[1]]}.{parts[2]}"
    return key


def _ignored(module: Any, key: str, kind: str) -> bool:
    """Keys the module's own class declares harmless to miss or to find extra (buffers it recomputes,
    weights tied to others)."""
    patterns = list(getattr(module, f"_keys_to_ignore_on_load_{kind}", None) or [])
    if kind == "missing":
        tied = getattr(module, "_tied_weights_keys", None) or []
        patterns += list(tied.keys()) + list(tied.values()) if isinstance(tied, dict) else list(tied)
    return any(re.search(p, key) for p in patterns)

"""Where a module's weights are stored, read one tensor at a time: what a streamed export copies from.

A module of a diffusers folder is built *empty* (:func:`empty_module`: its parameters on the meta device,
with shapes and no storage; its buffers computed as its class computes them), and :class:`StoredWeights`
maps each of its parameter names to the safetensors file and key that holds it, resolving the key
renames the libraries apply when they load (older diffusers attention names; CLIP's ``text_model.``
prefix, which transformers 5 saves without). An exporter then traces the empty module and copies each
weight from its file into the exported file, converted to the export precision on the way, so no more
than one tensor is in memory at once whatever the model's size.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: weight files the loaders read, in their order of preference (no variants: diffship loads none).
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
#: diffusers renames these attention weights of older checkpoints when it loads them.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class StoredTensor:
    """One stored tensor: its file, its key there, its shape and safetensors dtype (``F32``, ``BF16``...)."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a loader reads for one module: a sharded index's shards, or the one file."""
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    return []


def stored_tensors(folder: Path, module: Any) -> dict[str, StoredTensor]:
    """Every tensor stored for ``module`` in ``folder``, by the ``state_dict`` name the module's library
    loads it as (keys that match no name of the module stay as they are). Headers only: nothing is read.
    """
    from safetensors import safe_open

    diffusers = type(module).__module__.startswith("diffusers")
    stored: dict[str, StoredTensor] = {}
    for file in weight_files(Path(folder)):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                stored[_renamed(key) if diffusers else key] = StoredTensor(
                    file=file, key=key, shape=tuple(part.get_shape()), dtype=part.get_dtype())
    if not diffusers:
        stored = _prefixes_resolved(stored, set(module.state_dict()), module)
    return stored


def _renamed(key: str) -> str:
    """An older diffusers attention key as diffusers loads it (``...attentions.0.query.weight`` -> ``to_q``)."""
    parts = key.rsplit(".", 2)
    if len(parts) == 3 and parts[1] in _DEPRECATED_ATTENTION:
        return f"{parts[0]}.{_DEPRECATED_ATTENTION[parts[1]]}.{parts[2]}"
    return key


def _prefixes_resolved(stored: dict[str, Any], expected: set[str], module: Any) -> dict[str, Any]:
    """Stored keys as transformers maps them: with or without the model's prefix (``text_model.``, the
    layout of Stable Diffusion's CLIP checkpoints and of transformers 4, which transformers 5 reads
    though it saves the keys without it)."""
    prefixes = {p for p in (getattr(module, "base_model_prefix", ""), "text_model") if p}
    resolved = {}
    for key, value in stored.items():
        if key not in expected:
            candidates = [key[len(p) + 1:] for p in prefixes if key.startswith(p + ".")]
            candidates += [f"{p}.{key}" for p in prefixes]
            key = next((c for c in candidates if c in expected), key)
        resolved[key] = value
    return resolved


def ignored_key(module: Any, key: str, kind: str) -> bool:
    """Keys the module's own class declares harmless to miss or to find extra (buffers it recomputes,
    weights tied to others); ``kind`` is ``missing`` or ``unexpected``."""
    patterns = list(getattr(module, f"_keys_to_ignore_on_load_{kind}", None) or [])
    if kind == "missing":
        tied = getattr(module, "_tied_weights_keys", None) or []
        patterns += list(tied.keys()) + list(tied.values()) if isinstance(tied, dict) else list(tied)
    return any(re.search(p, key) for p in patterns)


class StoredWeights:
    """The stored weights of one empty module, read one tensor at a time.

    Args:
        folder: the module's folder in a diffusers pipeline folder.
        module: the module (empty or not: only its names are used).

    Raises:
        KeyError: (from :meth:`read`) a parameter with no stored tensor.
    """

    def __init__(self, folder: Path, module: Any):
        self.folder = Path(folder)
        tensors = stored_tensors(self.folder, module)
        # a tied weight is stored under one of its names (T5: shared.weight, not encoder.embed_tokens.weight)
        self.tensors = dict(tensors)
        for name, param in module.named_parameters(remove_duplicate=False):
            if name not in self.tensors:
                twin = next((n for n, p in module.named_parameters(remove_duplicate=False)
                             if p is param and n in tensors), None)
                if twin is not None:
                    self.tensors[name] = tensors[twin]

    def covers(self, module: Any) -> bool:
        """Whether every parameter of ``module`` is stored here with its shape."""
        return all(name in self.tensors and self.tensors[name].shape == tuple(p.shape)
                   for name, p in module.named_parameters())

    def read(self, name: str, dtype=None):
        """The tensor stored for parameter ``name``, as ``dtype`` (:func:`converted`), or as stored."""
        from safetensors import safe_open

        where = self.tensors[name]
        # opened per tensor: an open file stays mapped, and every page read through the mapping would count
        # in this process's resident memory until it closes (the whole model, by the last tensor)
        with safe_open(str(where.file), framework="pt") as f:
            tensor = f.get_tensor(where.key)
        return tensor if dtype is None else converted(tensor, dtype)


def converted(tensor: Any, dtype) -> Any:
    """``tensor`` as ``dtype``, through float32 between two reduced floating dtypes: as loading it into a
    float32 module and converting that would round it."""
    import torch

    if tensor.dtype == dtype:
        return tensor
    if tensor.is_floating_point() and tensor.dtype != torch.float32 and dtype != torch.float32:
        tensor = tensor.float()
    return tensor.to(dtype)


@dataclass(frozen=True)
class WeightRef:
    """Where one weight of a :func:`streamed_copy` comes from; called, its value in ``dtype`` (the
    placeholder's), read only then.

    Attributes:
        stored: the module's stored weights.
        name: the parameter's name in the module.
        dtype: the dtype the export takes it in.
    """

    stored: StoredWeights
    name: str
    dtype: Any

    def __call__(self):
        return self.stored.read(self.name, self.dtype)



def empty_module(library: str, class_name: str, folder: Path) -> Any:
    """Module ``library.class_name`` built from the config in ``folder``, its parameters on the meta device
    (no storage) and its buffers computed as the class computes them (position ids, frequencies), in
    eval mode."""
    import importlib

    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(library), class_name)
    with init_empty_weights(include_buffers=False):
        if library == "diffusers":
            module = cls.from_config(cls.load_config(folder))
        else:
            module = cls._from_config(cls.config_class.from_pretrained(folder))
    if hasattr(module, "tie_weights"):
        # as from_pretrained does (T5's encoder embeddings are its shared ones); outside the context, whose
        # parameter registration would make a new meta parameter of the tied one
        module.tie_weights()
    return module.eval()


def fill_buffers(module: Any, stored: StoredWeights) -> None:
    """Give an empty module the buffers its files store (SD3's positional embedding), as loading does;
    buffers the files lack keep the values the class computed."""
    buffers = dict(module.named_buffers())
    for name, where in stored.tensors.items():
        if name in buffers:
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner)
            sub._buffers[attr] = stored.read(name, buffers[name].dtype)


def copy_module_files(source: Path, folder: Path) -> None:
    """Copy one module's config and the weight files a loader reads from ``source`` into ``folder``."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    files = [source / "config.json", *weight_files(source)]
    files += [source / f"{name}.index.json" for name in WEIGHT_FILES if (source / f"{name}.index.json").is_file()]
    for file in files:
        shutil.copy2(file, folder / file.name)


def weight_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers (placeholders included), i.e. of its exported weights."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def is_empty(module: Any) -> bool:
    """Whether ``module`` is a torch module built empty (a parameter on the meta device)."""
    import torch

    return isinstance(module, torch.nn.Module) and any(p.is_meta for p in module.parameters())


def streamed_copy(wrapper: Any, eager: Any, stored: StoredWeights, dtype) -> tuple[Any, dict[str, Any]]:
    """A copy of ``wrapper`` (a spec's wrapper around the empty module ``eager``) to trace without weights,
    and where each of its weights comes from.

    Its parameters are placeholders: fake tensors (shapes and dtypes, no storage) in ``dtype`` (floating
    ones), all of one :class:`~torch._subclasses.fake_tensor.FakeTensorMode` (:func:`fake_mode`), which
    ``torch.export`` traces as it traces any module. Its floating buffers are converted to ``dtype``, as
    a converted module's are.

    Returns:
        The copy, and per parameter name of the copy (every name of a tied weight) a :class:`WeightRef`:
        called, its stored value in the placeholder's dtype.
    """
    import copy

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    names = {id(p): n for n, p in eager.named_parameters()}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, Any] = {}
    feed = {}
    for name, param in wrapper.named_parameters(remove_duplicate=False):  # a tied weight under each name
        kind = dtype if param.is_floating_point() else param.dtype
        if id(param) not in memo:
            with mode:
                memo[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=kind), requires_grad=False)
        feed[name] = WeightRef(stored, names[id(param)], kind)
    for buffer in wrapper.buffers():
        if id(buffer) not in memo:
            memo[id(buffer)] = buffer.detach().to(dtype) if buffer.is_floating_point() else buffer
    return copy.deepcopy(wrapper, memo), feed


def fake_mode(module: Any):
    """The fake-tensor mode of a :func:`streamed_copy`'s placeholders, else None."""
    from torch._subclasses.fake_tensor import FakeTensor

    return next((p.fake_mode for p in module.parameters() if isinstance(p, FakeTensor)), None)


def materialized(module: Any, weights: dict[str, Any]) -> Any:
    """A copy of a :func:`streamed_copy` holding its weights (read from ``weights``), to run in torch."""
    import copy

    import torch

    memo = {id(p): torch.nn.Parameter(weights[name](), requires_grad=False) for name, p in module.named_parameters()}
    # (named_parameters gives a tied weight once: it stays tied in the copy)
    return copy.deepcopy(module, memo)

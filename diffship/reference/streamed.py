"""Modules too large to build in memory, written to disk tensor by tensor.

``flux-arch`` holds FLUX.1-dev's 12B-parameter transformer (24 GB in bf16) and T5-XXL (9.5 GB in bf16):
neither fits beside the other on a 24 GB machine, and an fp32 build would need twice that. Such a
module is made on the meta device (its config, names and shapes, no storage); each of its tensors is
then drawn from its own seeded generator, cast to the stored dtype and written into safetensors shards
of at most :data:`SHARD_BYTES`, in the layout ``from_pretrained`` reads. Peak memory is one shard plus
one tensor in fp32, whatever the module's size.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from diffship.errors import DiffshipError

#: the most bytes one shard holds (and the build holds at once).
SHARD_BYTES = 2 * 10**9
#: per library: the weights file's stem ("<stem>-00001-of-00004.safetensors" + "<stem>.safetensors.index.json").
WEIGHT_STEMS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def tensor_plan(module: Any) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, how it is drawn, fan-in) of every tensor ``module`` saves, in ``state_dict`` order;
    a weight shared by two names (T5's embeddings) once.

    How: ``embedding`` (standard normal, as ``nn.Embedding`` initializes), ``norm`` (ones: the scale of a
    normalization layer), ``bias`` (uniform, PyTorch's ``nn.Linear`` bound from its weight's fan-in) or
    ``weight`` (uniform within 1/sqrt(fan-in), the bound of PyTorch's default ``nn.Linear`` and ``nn.Conv``
    initialization, so activations keep their scale through deep stacks).

    Raises:
        DiffshipError: the module saves a buffer (its values cannot be drawn at random).
    """
    import torch.nn as nn

    owners = {}
    for module_name, sub in module.named_modules():
        for attr, _ in sub.named_parameters(recurse=False):
            owners[f"{module_name}.{attr}" if module_name else attr] = (sub, attr)
    params = dict(module.named_parameters())  # shared parameters once
    plan = []
    for name, tensor in module.state_dict().items():
        if name not in params:
            if name in dict(module.named_buffers()):
                raise DiffshipError(f"{type(module).__name__} saves the buffer {name}; a streamed build draws "
                                    f"parameters only")
            continue  # the second name of a shared weight
        sub, attr = owners[name]
        shape = tuple(tensor.shape)
        weight = getattr(sub, "weight", None)
        fan_in = int(weight[0].numel()) if weight is not None and weight.dim() >= 2 else max(1, shape[-1] if shape else 1)
        if isinstance(sub, nn.Embedding):
            how = "embedding"
        elif attr == "bias":
            how = "bias"
        elif len(shape) >= 2:
            how = "weight"
        elif "norm" in type(sub).__name__.lower():  # LayerNorm, RMSNorm, T5LayerNorm, GroupNorm
            how = "norm"
        else:
            raise DiffshipError(f"{type(module).__name__}: no rule draws the 1-D parameter {name} "
                                f"({type(sub).__name__}.{attr})")
        plan.append((name, shape, how, fan_in))
    return plan


def draw(name: str, shape: tuple[int, ...], how: str, fan_in: int, seed: int):
    """One tensor in fp32, from a generator seeded by ``seed`` and the tensor's name (so one tensor's
    values do not depend on the others', nor on the order they are written in)."""
    import torch

    if how == "norm":
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if how == "embedding":
        return torch.randn(shape, generator=generator)
    bound = fan_in ** -0.5
    return torch.rand(shape, generator=generator).mul_(2 * bound).sub_(bound)


def write_streamed(module: Any, folder: Path, library: str, dtype: str, seed: int) -> int:
    """Write ``module``'s config and seeded weights (``dtype``: ``bfloat16``, ``float16``, ``float32``)
    into ``folder`` as ``from_pretrained`` reads them. Returns the bytes of weights written.

    Args:
        module: the module on the meta device.
        folder: the component folder (created).
        library: ``diffusers`` or ``transformers`` (the file names and config writer).
        dtype: the stored dtype.
        seed: the module's seed.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True)
    torch_dtype = getattr(torch, dtype)
    plan = tensor_plan(module)
    item = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[tuple]] = [[]]
    filled = 0
    for entry in plan:
        size = item * _numel(entry[1])
        if shards[-1] and filled + size > SHARD_BYTES:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += size
    stem = WEIGHT_STEMS[library]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: draw(name, shape, how, fan_in, seed).to(torch_dtype)
                   for name, shape, how, fan_in in shard}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    if library == "diffusers":
        module.save_config(folder)
    else:
        module.config.torch_dtype = torch_dtype
        module.config.save_pretrained(folder)
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

"""Run a module built empty, reading each layer's weights from the source's files as the layer is called.

A model larger than memory (FLUX.1-dev's transformer: 48 GB in float32) cannot be loaded to compute the
eager reference of its export. Within :func:`weights_on_call`, every submodule that holds parameters of its
own reads them (:class:`~diffship.reference.weights.StoredWeights`) just before its forward runs and drops
them after, so memory holds one layer's weights at a time. Slow (each weight is read per call, from disk)
and meant for one reference call, not for generating images. A parameter used outside its own module's
forward stays on the meta device, and the call fails there rather than computing with it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def weights_on_call(module: nn.Module, stored: Any, dtype: torch.dtype = torch.float32) -> Iterator[nn.Module]:
    """Within: ``module`` (built empty: :func:`~diffship.reference.weights.empty_module`) runs with each
    layer's weights read from ``stored`` (a :class:`~diffship.reference.weights.StoredWeights`) as ``dtype``
    for the layer's call and released after it. Its parameters are placeholders again on exit."""
    handles = []
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    placeholders = [(owner, dict(owner._parameters)) for owner in module.modules() if owner._parameters]
    for owner, own in placeholders:

        def load(layer: nn.Module, _args, own=own) -> None:
            for attr, placeholder in own.items():
                if placeholder is not None:
                    kind = dtype if placeholder.is_floating_point() else None
                    layer._parameters[attr] = nn.Parameter(stored.read(names[id(placeholder)], kind),
                                                           requires_grad=False)

        def release(layer: nn.Module, _args, _output, own=own) -> None:
            layer._parameters.update(own)

        handles += [owner.register_forward_pre_hook(load), owner.register_forward_hook(release)]
    try:
        yield module
    finally:
        for handle in handles:
            handle.remove()
        for owner, own in placeholders:  # a call that failed midway left its layer's weights in place
            owner._parameters.update(own)

"""Attention variants for export: the same attention as diffusers', arranged for other hardware.

``original`` is diffusers' own attention (scaled dot-product over (batch, sequence, channels)), best
on GPUs. ``split_einsum`` is the layout Apple's Neural Engine prefers (Apple's ml-stable-diffusion):
activations as (batch, channels, 1, sequence), projections as 1x1 convolutions, and one pair of
einsums per head instead of a batched matmul over a (batch x heads) reshape, which the Neural Engine
handles poorly. It computes the same function -- tests check it against diffusers' attention.

Variants are applied to a *copy* of a module (:func:`with_attention`) through diffusers' public
``Attention.set_processor``; the user's pipeline is never changed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from diffship.errors import ExportError

VARIANTS = ("original", "split_einsum")


def _conv1x1(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """A linear layer applied to (B, C, 1, S) as the equivalent 1x1 convolution."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


class SplitEinsumAttnProcessor:
    """diffusers attention processor computing attention per head with einsums on a (B, C, 1, S) layout.

    Supports what Stable Diffusion's UNets and VAEs use: self- and cross-attention, 3-D (B, S, C) and
    4-D (B, C, H, W) inputs, group norm, cross-attention norm, residual connection and output rescale.
    Attention masks, spatial norm and q/k norms are refused at export time rather than ignored.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None \
                or attn.norm_k is not None:
            raise ExportError("split_einsum attention supports no attention mask, spatial norm or q/k norm; "
                              "export with -o attention=original")
        residual = hidden_states
        if hidden_states.ndim == 4:  # (B, C, H, W): already channels first
            batch, channels, height, width = hidden_states.shape
            x = attn.group_norm(hidden_states) if attn.group_norm is not None else hidden_states
            x = x.reshape(batch, channels, 1, height * width)
        else:  # (B, S, C)
            x = hidden_states.transpose(1, 2)
            if attn.group_norm is not None:
                x = attn.group_norm(x)
            x = x.unsqueeze(2)
        if encoder_hidden_states is None:
            context = x
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            context = encoder_hidden_states.transpose(1, 2).unsqueeze(2)
        query, key, value = _conv1x1(x, attn.to_q), _conv1x1(context, attn.to_k), _conv1x1(context, attn.to_v)
        head_dim = key.shape[1] // attn.heads
        scale = head_dim ** -0.5  # what diffusers' scaled-dot-product processor uses
        heads = []
        for q, k, v in zip(query.split(head_dim, dim=1), key.split(head_dim, dim=1), value.split(head_dim, dim=1)):
            weights = torch.einsum("bchq,bchk->bkhq", q, k) * scale
            weights = weights.softmax(dim=1)
            heads.append(torch.einsum("bkhq,bchk->bchq", weights, v))
        out = _conv1x1(torch.cat(heads, dim=1), attn.to_out[0])
        out = attn.to_out[1](out)  # dropout (identity in eval)
        if residual.ndim == 4:
            out = out.reshape(residual.shape)
        else:
            out = out.squeeze(2).transpose(1, 2)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def with_attention(module: nn.Module, variant: str) -> nn.Module:
    """``module`` itself for ``original``; for ``split_einsum`` a copy whose diffusers attention layers
    use :class:`SplitEinsumAttnProcessor` (modules without diffusers attention come back unchanged)."""
    if variant not in VARIANTS:
        raise ExportError(f"unknown attention variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    from diffusers.models.attention_processor import Attention

    if variant == "original" or not any(isinstance(m, Attention) for m in module.modules()):
        return module
    variant_module = copy.deepcopy(module)
    for m in variant_module.modules():
        if isinstance(m, Attention):
            m.set_processor(SplitEinsumAttnProcessor())
    return variant_module

"""Wrapper modules: the exact graphs that get exported, one per component kind.

Each wraps the eager diffusers/transformers module and fixes its call to positional tensors in, a tuple
of tensors out, named by the component's spec. Their code decides what every exported graph computes,
so it is part of the key of cached exports (:func:`graph_fingerprint`).
"""

from __future__ import annotations

import torch
from torch import nn

from diffship._files import code_fingerprint

#: bump when the exported graphs change in a way this module's code does not show (a behaviour of
#: diffusers or transformers they rely on); code changes are seen by :func:`graph_fingerprint`.
GRAPH_VERSION = 1


def graph_fingerprint() -> str:
    """What the exported graphs depend on from diffship's side: :data:`GRAPH_VERSION` and this module's
    code (comments and docstrings left out, so editing them keeps cached exports)."""
    import sys

    return f"{GRAPH_VERSION}:{code_fingerprint(sys.modules[__name__])}"


class TextEncoderWrapper(nn.Module):
    """``input_ids -> outputs`` of a CLIP text model, named as in ``outputs``: ``last_hidden_state``,
    ``pooler_output``, ``text_embeds`` (``CLIPTextModelWithProjection``) and ``penultimate_hidden_state``
    (``hidden_states[-2]``, the embeddings SDXL conditions on)."""

    def __init__(self, text_encoder: nn.Module, outputs: tuple[str, ...] = ("last_hidden_state", "pooler_output")):
        super().__init__()
        self.text_encoder = text_encoder
        self.outputs = outputs

    def forward(self, input_ids: torch.Tensor):
        hidden = PENULTIMATE in self.outputs
        out = self.text_encoder(input_ids, output_hidden_states=hidden, return_dict=True)
        return tuple(out.hidden_states[-2] if name == PENULTIMATE else out[name] for name in self.outputs)


#: the text-encoder output holding ``hidden_states[-2]``.
PENULTIMATE = "penultimate_hidden_state"


class UNetWrapper(nn.Module):
    """``(sample, timestep, encoder_hidden_states[, timestep_cond]) -> out_sample``; ``timestep_cond`` is
    the guidance embedding of LCM-distilled UNets (``time_cond_proj_dim``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class SDXLUNetWrapper(nn.Module):
    """``(sample, timestep, encoder_hidden_states, text_embeds, time_ids[, timestep_cond]) -> out_sample``:
    the SDXL UNet with its added conditions (pooled text embeddings, size and crop ids)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, timestep_cond: torch.Tensor | None = None):
        # diffusers concatenates text_embeds with the float32 time-id embedding, which torch promotes to
        # float32; the ONNX exporter would emit a Concat of mixed types instead, so promote explicitly.
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs={"text_embeds": text_embeds.float(), "time_ids": time_ids},
                         return_dict=False)[0]


class SD3TransformerWrapper(nn.Module):
    """``(hidden_states, encoder_hidden_states, pooled_projections, timestep) -> out_hidden_states``: the
    MMDiT of Stable Diffusion 3 / 3.5 (joint attention over image patches and text tokens)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


class FluxTransformerWrapper(nn.Module):
    """``(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids[, guidance]) ->
    out_hidden_states``: the Flux transformer over packed latents (2x2 latent pixels per token), its 3-axis
    rotary embedding computed in the graph from the ids; ``guidance`` is FLUX.1-dev's guidance embedding
    (schnell has none)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                timestep: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor | None = None):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


class VaeEncoderWrapper(nn.Module):
    """``sample -> latent_parameters`` (mean and log-variance); sampling stays on the host."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor):
        return self.vae.encode(sample, return_dict=True).latent_dist.parameters


class VaeDecoderWrapper(nn.Module):
    """``latent_sample -> sample`` (image in [-1, 1], unclamped)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor):
        return self.vae.decode(latent_sample, return_dict=False)[0]

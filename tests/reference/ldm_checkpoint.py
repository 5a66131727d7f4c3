"""Write a diffusers Stable Diffusion 1.x pipeline as an original (LDM) single-file checkpoint.

Test helper: the inverse of diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` and
``convert_ldm_clip_checkpoint`` (``diffusers/loaders/single_file_utils.py``), so tests can make the kind of
``.safetensors``/``.ckpt`` file that ``StableDiffusionPipeline.from_single_file`` reads without downloading
one. Block indices are derived from the model configs, so any SD-1.x-shaped UNet/VAE works, not only the
``tiny`` preset's.
"""

from __future__ import annotations

import re
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}  # conv_in, conv_out, (post_)quant_conv keep their names
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(key: str, n: int) -> tuple[list[str], str]:
    """The first ``n`` dot-separated parts of ``key`` and the rest."""
    parts = key.split(".")
    return parts[:n], ".".join(parts[n:])


def _layers_per_block(config) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        # diffusers' converter indexes blocks with a single int too; per-block counts never occur in SD 1.x.
        raise ValueError(f"per-block layers_per_block {lpb!r} has no LDM layout")
    return lpb


def unet_to_ldm(state_dict: dict, config) -> dict:
    """Rename a ``UNet2DConditionModel`` state dict to the LDM ``openaimodel.UNetModel`` layout.

    LDM numbers the UNet as flat sequences: ``input_blocks`` (``conv_in``, then per down block
    ``layers_per_block`` resnet[+attention] entries and a downsampler entry, except after the last block),
    ``middle_block`` (resnet, attention, resnet) and ``output_blocks`` (``layers_per_block + 1`` entries per
    up block, the last one also holding the upsampler).

    Args:
        state_dict: the diffusers UNet state dict.
        config: the UNet config (``unet.config``).

    Returns:
        The state dict with LDM keys, without the ``model.diffusion_model.`` prefix.

    Raises:
        ValueError: a key has no SD-1.x LDM equivalent (class/addition embeddings, per-block layer counts).
    """
    lpb = _layers_per_block(config)
    # Which up blocks have attentions decides where their upsampler sits (slot 2 instead of 1).
    up_with_attn = {int(k.split(".")[1]) for k in state_dict if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in state_dict.items():
        head = key.split(".", 1)[0]
        if head in ("down_blocks", "up_blocks"):
            (_, block, kind, layer), rest = _split(key, 4)
            block, layer = int(block), int(layer)
            if head == "down_blocks":
                # +1: input_blocks.0 is conv_in.
                idx = 1 + block * (lpb + 1) + layer
                if kind == "downsamplers":  # "0.conv.weight" -> "op.weight", one past the block's layers
                    new = f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op.{rest.split('.', 1)[1]}"
                else:
                    new = f"input_blocks.{idx}.{0 if kind == 'resnets' else 1}.{rest}"
            else:
                idx = block * (lpb + 1) + layer
                if kind == "upsamplers":  # after the attention when the block has one
                    last = block * (lpb + 1) + lpb
                    new = f"output_blocks.{last}.{2 if block in up_with_attn else 1}.{rest}"
                else:
                    new = f"output_blocks.{idx}.{0 if kind == 'resnets' else 1}.{rest}"
            if kind == "resnets":
                new = _rename_resnet(new)
        elif head == "mid_block":
            (_, kind, layer), rest = _split(key, 3)
            slot = 2 * int(layer) if kind == "resnets" else 1
            new = f"middle_block.{slot}.{rest}"
            if kind == "resnets":
                new = _rename_resnet(new)
        else:
            module, _, param = key.rpartition(".")
            if module not in _UNET_TOP:
                raise ValueError(f"UNet parameter {key} has no SD-1.x LDM equivalent")
            new = f"{_UNET_TOP[module]}.{param}"
        out[new] = value
    return out


def _rename_resnet(key: str) -> str:
    """``<prefix>.<n>.norm1.weight`` -> ``<prefix>.<n>.in_layers.0.weight`` (resnet sub-module names only)."""
    module, _, param = key.rpartition(".")
    prefix, _, name = module.rpartition(".")
    return f"{prefix}.{_UNET_RESNET[name]}.{param}"


def vae_to_ldm(state_dict: dict, config) -> dict:
    """Rename an ``AutoencoderKL`` state dict to the LDM ``AutoencoderKL`` layout.

    LDM numbers decoder up blocks from the lowest resolution's opposite end (``up.{n-1}`` is diffusers'
    ``up_blocks.0``) and stores the mid-block attention's q/k/v/proj_out as 1x1 convolutions.

    Args:
        state_dict: the diffusers VAE state dict.
        config: the VAE config (``vae.config``).

    Returns:
        The state dict with LDM keys, without the ``first_stage_model.`` prefix.
    """
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key):
            coder, direction, block, kind, layer, rest = m.groups()
            block = int(block) if direction == "down" else n_up - 1 - int(block)
            if kind == "resnets":
                new = f"{coder}.{direction}.{block}.block.{layer}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:  # "{down,up}samplers.0.conv" -> "{down,up}sample.conv"
                new = f"{coder}.{direction}.{block}.{direction}sample.{rest}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            coder, layer, rest = m.groups()
            new = f"{coder}.mid.block_{int(layer) + 1}.{rest}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            coder, module, param = m.groups()
            new = f"{coder}.mid.attn_1.{_VAE_ATTN[module]}.{param}"
            if module != "group_norm" and param == "weight":
                value = value[:, :, None, None]  # Linear -> 1x1 Conv2d, as the LDM checkpoint stores it
        else:
            coder, _, rest = key.partition(".")
            module, _, param = rest.rpartition(".")
            if coder in ("encoder", "decoder") and module in _VAE_TOP:
                new = f"{coder}.{_VAE_TOP[module]}.{param}"
            else:
                new = key
        out[new] = value
    return out


def clip_to_ldm(state_dict: dict) -> dict:
    """Key a ``CLIPTextModel`` state dict as ``FrozenCLIPEmbedder.transformer`` does (``text_model.*``).

    Recent transformers flatten ``CLIPTextModel`` (no ``text_model.`` level); the original checkpoints
    always have it.
    """
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


def ldm_state_dict(pipe) -> dict:
    """The full original-layout state dict of a Stable Diffusion 1.x pipeline (UNet, VAE, CLIP text encoder)."""
    import torch

    sd = {}
    sd.update({UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()})
    sd.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    clip = clip_to_ldm(pipe.text_encoder.state_dict())
    # Original checkpoints carry the position_ids buffer, which newer transformers do not save.
    pos = clip["text_model.embeddings.position_embedding.weight"]
    clip.setdefault("text_model.embeddings.position_ids", torch.arange(pos.shape[0])[None])
    sd.update({CLIP_PREFIX + k: v for k, v in clip.items()})
    # safetensors refuses shared or non-contiguous storage (e.g. the unsqueezed VAE attention weights).
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_ldm_checkpoint(pipe, path: str | Path) -> Path:
    """Save ``pipe`` as an original Stable Diffusion v1 single-file checkpoint (safetensors).

    Args:
        pipe: a ``StableDiffusionPipeline`` (SD-1.x architecture: CLIP text encoder, cross-attention UNet,
            ``AutoencoderKL``).
        path: the ``.safetensors`` file to write.

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    save_file(ldm_state_dict(pipe), str(path))
    return path

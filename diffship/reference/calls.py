"""Call mapping: a diffusers-style call on an eager module (its bound arguments) -> the spec's input
tensors, refusing what an exported graph cannot honour."""

from __future__ import annotations

from typing import Any

import torch

from diffship.errors import ShapeError


def text_encoder_inputs(a: dict[str, Any], hidden: bool = False, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` as int64, refusing what eager torch refuses: token ids that are not integers or lie
    outside the vocabulary (an exported graph would silently read another embedding row)."""
    mask = a.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise ShapeError("text_encoder: exported text encoders take no attention mask (CLIP does not use one); "
                         "pass attention_mask=None")
    if a.get("output_hidden_states") and not hidden:
        raise ShapeError("text_encoder: this export has no hidden-state outputs, so clip_skip is not supported; "
                         "call without clip_skip")
    ids = torch.as_tensor(a["input_ids"])
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ShapeError(f"text_encoder: input_ids must be integer token ids, got {ids.dtype}; tokenize the prompt "
                         f"with the pipeline's tokenizer")
    if ids.numel() and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        span = f" (0..{vocab_size - 1})" if vocab_size else ""
        raise ShapeError(f"text_encoder: input_ids holds {bad}, outside the vocabulary{span}; tokenize the prompt "
                         f"with the pipeline's tokenizer")
    return {"input_ids": ids.to(torch.int64)}


def _refuse(a: dict[str, Any], names: tuple[str, ...], hints: dict[str, str] | None = None,
            component: str = "transformer") -> None:
    """Refuse by name the denoiser call arguments in ``names`` that are set: the exported graph cannot
    honour them, and refusing beats silently returning a different result (an empty kwargs dict changes
    nothing, so it passes)."""
    unsupported = [k for k in names if a.get(k) is not None and not (k.endswith("kwargs") and not a[k])]
    if unsupported:
        hint = "".join(f" ({h})" for k, h in (hints or {}).items() if k in unsupported)
        raise ShapeError(f"{component}: this export does not take {', '.join(unsupported)}{hint}; call without them")


def _per_row(value: Any, rows: int) -> torch.Tensor:
    """A scalar or one-element timestep (or guidance) as one float32 value per batch row."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim == 0 or t.numel() == 1:
        t = t.reshape(1).expand(rows)
    return t.contiguous()


#: UNet call arguments an exported graph can take as inputs, and where diffusers passes them.
_ADDED = {"text_embeds": "added_cond_kwargs", "time_ids": "added_cond_kwargs", "timestep_cond": "timestep_cond"}


def unet_inputs(a: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    takes = {_ADDED[name] for name in extra}
    _refuse(a, tuple(k for k in ("class_labels", "timestep_cond", "added_cond_kwargs", "down_block_additional_residuals",
                                 "mid_block_additional_residual", "down_intrablock_additional_residuals",
                                 "encoder_attention_mask", "attention_mask", "cross_attention_kwargs")
                     if k not in takes), component="unet")
    sample = a["sample"]
    out = {"sample": sample, "timestep": _per_row(a["timestep"], sample.shape[0]),
           "encoder_hidden_states": a["encoder_hidden_states"]}
    for name in extra:
        value = a.get(name) if _ADDED[name] == name else (a.get(_ADDED[name]) or {}).get(name)
        if value is None:
            raise ShapeError(f"unet: this export needs {name} (passed as {_ADDED[name]}); "
                             f"the UNet it was exported from takes it")
        out[name] = value
    return out


def sd3_transformer_inputs(a: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The MMDiT's four tensors; what its exported graph cannot take is refused by name (ControlNet
    residuals, skip-layer guidance, attention kwargs such as a LoRA scale)."""
    _refuse(a, ("block_controlnet_hidden_states", "skip_layers", "joint_attention_kwargs"),
            {"skip_layers": "skip-layer guidance: call without skip_guidance_layers"})
    hidden = a["hidden_states"]
    return {"hidden_states": hidden, "encoder_hidden_states": a["encoder_hidden_states"],
            "pooled_projections": a["pooled_projections"], "timestep": _per_row(a["timestep"], hidden.shape[0])}


def flux_transformer_inputs(a: dict[str, Any], guidance: bool = True) -> dict[str, torch.Tensor]:
    """The Flux transformer's tensors (``guidance`` where the model has FLUX.1-dev's guidance embedding);
    ControlNet residuals and attention kwargs (a LoRA scale, IP-adapter embeddings) are refused by name.
    Ids in diffusers' deprecated 3-d layout (a batch axis) are taken as their first row, as diffusers does."""
    _refuse(a, ("controlnet_block_samples", "controlnet_single_block_samples", "joint_attention_kwargs"))
    hidden = a["hidden_states"]
    ids = {k: a[k][0] if a[k].ndim == 3 else a[k] for k in ("img_ids", "txt_ids")}
    out = {"hidden_states": hidden, "encoder_hidden_states": a["encoder_hidden_states"],
           "pooled_projections": a["pooled_projections"], "timestep": _per_row(a["timestep"], hidden.shape[0]),
           "img_ids": ids["img_ids"].float(), "txt_ids": ids["txt_ids"].float()}
    if guidance:
        if a.get("guidance") is None:
            raise ShapeError("transformer: this export takes a guidance value (FLUX.1-dev's guidance embedding); pass "
                             "guidance, as the Flux pipelines do")
        out["guidance"] = _per_row(a["guidance"], hidden.shape[0])
    elif a.get("guidance") is not None:
        raise ShapeError("transformer: this export has no guidance embedding (a FLUX.1-schnell-style model); "
                         "call with guidance=None")
    return out


def vae_encoder_inputs(a: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"sample": a["x"]}


def vae_decoder_inputs(a: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"latent_sample": a["z"]}

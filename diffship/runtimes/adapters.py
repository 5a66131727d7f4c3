"""Adapters: stand-ins for the torch modules of a diffusers pipeline, over exported components.

Adapters behave like the modules as far as pipelines and users touch them -- ``.config``, ``.dtype``,
``.device``, calls with the same arguments returning the same output classes -- and forward the tensors
to a backend :class:`~diffship.runtimes.base.Runner`. Host-side tensors stay float32; runners cast to the
export's dtypes. Every call checks that the tensors going in and coming out are finite (NaN or Inf are
refused with the component and denoising step where they appeared, never turned into an image), unless
the pipeline was loaded with ``check_finite=False``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffship.errors import ExportedModelError, NonFiniteError, ShapeError
from diffship.reference.specs import ComponentSpec
from diffship.reference.wrappers import PENULTIMATE
from diffship.runtimes.base import Runner


class _Adapter(torch.nn.Module):
    """Common surface of the adapters: config, dtype, device, and the call mapping of a spec.

    An ``nn.Module`` without parameters, so diffusers counts it when it asks where the pipeline runs
    (``pipe.device``): a pipeline over CUDA runners creates its latents on the GPU and keeps them there.
    """

    dtype = torch.float32

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]],
                 check_finite: bool = True):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.config = FrozenDict(config)
        self._device = next((runner.device for _, runner in parts.values()), torch.device("cpu"))
        self.check_finite = check_finite

    @property
    def device(self) -> torch.device:
        """Where the runners take and return tensors (the CPU, or the GPU of a CUDA runtime)."""
        return self._device

    def to(self, *args: Any, **kwargs: Any) -> "_Adapter":
        """Accepted for compatibility with ``pipe.to(...)``; placement is the runner's (device) choice."""
        return self

    def eval(self) -> "_Adapter":
        return self

    def __getattr__(self, name: str) -> Any:
        # Like diffusers' ModelMixin: config entries read as attributes (`unet.in_channels`).
        config = self.__dict__.get("config")
        if config is not None and name in config:
            return config[name]
        return super().__getattr__(name)

    def _run(self, spec: ComponentSpec, runner: Runner, method: Any, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        inputs = spec.inputs_for_call(method, args, kwargs)
        spec.check_sizes(inputs)
        where = self._where(inputs)
        if self.check_finite and (bad := _non_finite(inputs)):
            raise NonFiniteError(f"{spec.name}: its input {bad} holds NaN or Inf{where}; they were made before this "
                                 f"call (the scheduler step, guidance -- is guidance_scale finite? -- or latents passed "
                                 f"in), so no image is made from them")
        outputs = {k: v.float() if v.is_floating_point() else v for k, v in runner.infer(inputs).items()}
        if self.check_finite and (bad := _non_finite(outputs)):
            raise NonFiniteError(f"{spec.name}: its output {bad} holds NaN or Inf{where} from finite inputs (the export "
                                 f"overflows: check it with diffship parity, or re-export in fp32)")
        return outputs

    def _where(self, inputs: dict[str, torch.Tensor]) -> str:
        """Where in a pipeline call this call is, for messages (the UNet names its denoising step)."""
        return ""


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf, else None."""
    return next((name for name, t in tensors.items()
                 if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


class _HiddenStates(tuple):
    """``hidden_states`` of an exported text encoder: the embeddings and every layer's output in
    transformers' layout, of which an export holds the last two; reading another (clip_skip) is refused."""

    def __new__(cls, layers: int, known: dict[int, torch.Tensor]):
        return super().__new__(cls, [known.get(i) for i in range(layers + 1)])

    def __getitem__(self, index):
        value = super().__getitem__(index)
        if value is None:
            raise ShapeError("text_encoder: this export holds only the last two hidden states, so clip_skip is not "
                             "supported; call without clip_skip")
        return value


class TextEncoderAdapter(_Adapter):
    """Stands in for ``CLIPTextModel`` (``text_encoder(input_ids)[0]`` is the last hidden state),
    ``CLIPTextModelWithProjection`` (``[0]`` is ``text_embeds``, SDXL's pooled embedding) and
    ``T5EncoderModel`` (``[0]`` is the last hidden state). With ``output_hidden_states=True``,
    ``hidden_states[-2]`` (SDXL's conditioning) and ``[-1]`` are there."""

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]],
                 check_finite: bool = True):
        super().__init__(config, parts, check_finite)
        (self.spec, self.runner), = parts.values()

    def __call__(self, input_ids, attention_mask=None, position_ids=None, output_attentions=None,
                 output_hidden_states=None, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        out = self._run(self.spec, self.runner, self.__call__, (input_ids,),
                        {"attention_mask": attention_mask, "output_hidden_states": output_hidden_states})
        hidden = None
        if output_hidden_states:
            layers = self.config["num_hidden_layers"]
            hidden = _HiddenStates(layers, {layers - 1: out[PENULTIMATE], layers: out["last_hidden_state"]})
        if "text_embeds" in out:
            result = CLIPTextModelOutput(text_embeds=out["text_embeds"], last_hidden_state=out["last_hidden_state"],
                                         hidden_states=hidden)
        else:
            result = BaseModelOutputWithPooling(last_hidden_state=out["last_hidden_state"],
                                                pooler_output=out.get("pooler_output"), hidden_states=hidden)
        return result if return_dict else result.to_tuple()

    forward = __call__


class _Denoiser(_Adapter):
    """A denoiser's adapter: names the timestep and denoising step of a call in messages."""

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]],
                 check_finite: bool = True):
        super().__init__(config, parts, check_finite)
        #: the last timestep seen and the denoising step it was (timesteps fall during a pipeline call; a
        #: rise starts a new call; a repeat is a second-order scheduler's second evaluation of one step).
        self._last_t: float | None = None
        self._step = 0

    def _where(self, inputs: dict[str, torch.Tensor]) -> str:
        t = float(inputs["timestep"].reshape(-1)[0])
        if self._last_t is None or t > self._last_t:
            self._step = 1
        elif t < self._last_t:
            self._step += 1
        self._last_t = t
        return f" at timestep {t:g} (denoising step {self._step})"


class UNetAdapter(_Denoiser):
    """Stands in for ``UNet2DConditionModel``: ``unet(latents, t, encoder_hidden_states=emb).sample``, with
    SDXL's ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) and LCM's ``timestep_cond`` where the
    export takes them."""

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]],
                 check_finite: bool = True):
        from types import SimpleNamespace

        super().__init__(config, parts, check_finite)
        self.spec, self.runner = parts["unet"]
        if config.get("addition_embed_type") == "text_time":
            # SDXL pipelines check their time ids against the width of the UNet's added-condition layer.
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(
                in_features=config["projection_class_embeddings_input_dim"]))

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                 attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None,
                 down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict=True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        extra = dict(class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
                     cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                     down_block_additional_residuals=down_block_additional_residuals,
                     mid_block_additional_residual=mid_block_additional_residual,
                     down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                     encoder_attention_mask=encoder_attention_mask)
        out = self._run(self.spec, self.runner, self.__call__, (sample, timestep, encoder_hidden_states),
                        extra)["out_sample"]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    forward = __call__


class SD3TransformerAdapter(_Denoiser):
    """Stands in for ``SD3Transformer2DModel``: ``transformer(hidden_states=..., timestep=...,
    encoder_hidden_states=..., pooled_projections=...)``; what the export cannot take (ControlNet
    residuals, skip-layer guidance's ``skip_layers``, attention kwargs) is refused by name."""

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]],
                 check_finite: bool = True):
        super().__init__(config, parts, check_finite)
        self.spec, self.runner = parts["transformer"]

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                 block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True, skip_layers=None):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        out = self._run(self.spec, self.runner, self.__call__, (hidden_states,),
                        dict(encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                             timestep=timestep, block_controlnet_hidden_states=block_controlnet_hidden_states,
                             joint_attention_kwargs=joint_attention_kwargs, skip_layers=skip_layers))
        sample = out["out_hidden_states"]
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    forward = __call__


class FluxTransformerAdapter(_Denoiser):
    """Stands in for ``FluxTransformer2DModel``: ``transformer(hidden_states=..., timestep=..., guidance=...,
    pooled_projections=..., encoder_hidden_states=..., txt_ids=..., img_ids=...)``; ControlNet residuals and
    attention kwargs are refused by name. ``cache_context`` (diffusers' caching hooks, which the Flux
    pipelines enter around each call) does nothing: an exported graph keeps no cache."""

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]],
                 check_finite: bool = True):
        super().__init__(config, parts, check_finite)
        self.spec, self.runner = parts["transformer"]

    def __call__(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None, img_ids=None,
                 txt_ids=None, guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                 controlnet_single_block_samples=None, return_dict=True, controlnet_blocks_repeat=False):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        out = self._run(self.spec, self.runner, self.__call__, (hidden_states,),
                        dict(encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                             timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                             joint_attention_kwargs=joint_attention_kwargs,
                             controlnet_block_samples=controlnet_block_samples,
                             controlnet_single_block_samples=controlnet_single_block_samples))
        sample = out["out_hidden_states"]
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    forward = __call__

    def cache_context(self, name: str):
        import contextlib

        return contextlib.nullcontext()


def _transformer_adapter(config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]],
                         check_finite: bool = True) -> _Adapter:
    """The adapter of the exported transformer: Flux's (it takes ``img_ids``) or SD3's MMDiT."""
    spec, _ = parts["transformer"]
    cls = FluxTransformerAdapter if "img_ids" in spec.input_names else SD3TransformerAdapter
    return cls(config, parts, check_finite)


class VaeAdapter(_Adapter):
    """Stands in for ``AutoencoderKL``: ``encode`` (latent distribution sampled on the host) and ``decode``."""

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]],
                 check_finite: bool = True):
        super().__init__(config, parts, check_finite)
        self.encoder = parts.get("vae_encoder")
        self.decoder = parts.get("vae_decoder")

    def encode(self, x, return_dict=True):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        if self.encoder is None:
            raise ExportedModelError("this export has no vae_encoder; re-export with it for image-to-image or inpainting")
        params = self._run(*self.encoder, self.encode, (x,), {})["latent_parameters"]
        dist = DiagonalGaussianDistribution(params)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z, return_dict=True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        if self.decoder is None:
            raise ExportedModelError("this export has no vae_decoder; re-export with it to decode images")
        sample = self._run(*self.decoder, self.decode, (z,), {})["sample"]
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    # AutoencoderKL switches: the exported graphs are whole-image, so slicing/tiling are no-ops here.
    def enable_slicing(self) -> None: ...
    def disable_slicing(self) -> None: ...
    def enable_tiling(self, *args: Any, **kwargs: Any) -> None: ...
    def disable_tiling(self) -> None: ...


#: adapter class per pipeline attribute (the ``source`` of the specs it serves).
ADAPTERS: dict[str, Callable[..., _Adapter]] = {
    "text_encoder": TextEncoderAdapter, "text_encoder_2": TextEncoderAdapter, "text_encoder_3": TextEncoderAdapter,
    "unet": UNetAdapter, "transformer": _transformer_adapter, "vae": VaeAdapter}

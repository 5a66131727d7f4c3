"""Exported pipelines behind diffusers' own pipeline classes.

:func:`load_pipeline` builds the diffusers pipeline named in the export (or one for another task of
the same family) and hands it adapters in place of the torch modules. Adapters behave like the modules
as far as pipelines and users touch them -- ``.config``, ``.dtype``, ``.device``, calls with the same
arguments returning the same output classes -- and forward the tensors to a backend :class:`Runner`.
Host-side tensors stay float32 on the CPU; runners cast to the export's dtypes.

diffship's own tools use :func:`open_export`, which returns an :class:`ExportedPipeline`: the diffusers
pipeline with the manifest and runners beside it (nothing is patched onto the diffusers object), closed
as a context manager. A pipeline from :func:`load_pipeline` closes its runners when it is collected.
"""

from __future__ import annotations

import importlib
import inspect
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffship._files import read_json
from diffship.backends.manifest import Manifest, read_manifest
from diffship.errors import ExportedModelError, ShapeError
from diffship.reference.families import family_of
from diffship.reference.specs import ComponentSpec
from diffship.reference.wrappers import PENULTIMATE
from diffship.runtimes import open_runner
from diffship.runtimes.base import Runner


class _Adapter(torch.nn.Module):
    """Common surface of the adapters: config, dtype, device, and the call mapping of a spec.

    An ``nn.Module`` without parameters, so diffusers counts it when it asks where the pipeline runs
    (``pipe.device``): a pipeline over CUDA runners creates its latents on the GPU and keeps them there.
    """

    dtype = torch.float32

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]]):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.config = FrozenDict(config)
        self._device = next((runner.device for _, runner in parts.values()), torch.device("cpu"))

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

    @staticmethod
    def _run(spec: ComponentSpec, runner: Runner, method: Any, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        inputs = spec.inputs_for_call(method, args, kwargs)
        spec.check_multiples(inputs)
        return {k: v.float() if v.is_floating_point() else v for k, v in runner.infer(inputs).items()}


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
    """Stands in for ``CLIPTextModel`` (``text_encoder(input_ids)[0]`` is the last hidden state) and
    ``CLIPTextModelWithProjection`` (``[0]`` is ``text_embeds``, SDXL's pooled embedding). With
    ``output_hidden_states=True``, ``hidden_states[-2]`` (SDXL's conditioning) and ``[-1]`` are there."""

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]]):
        super().__init__(config, parts)
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


class UNetAdapter(_Adapter):
    """Stands in for ``UNet2DConditionModel``: ``unet(latents, t, encoder_hidden_states=emb).sample``, with
    SDXL's ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) and LCM's ``timestep_cond`` where the
    export takes them."""

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]]):
        from types import SimpleNamespace

        super().__init__(config, parts)
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


class VaeAdapter(_Adapter):
    """Stands in for ``AutoencoderKL``: ``encode`` (latent distribution sampled on the host) and ``decode``."""

    def __init__(self, config: dict[str, Any], parts: dict[str, tuple[ComponentSpec, Runner]]):
        super().__init__(config, parts)
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
ADAPTERS: dict[str, type[_Adapter]] = {"text_encoder": TextEncoderAdapter, "text_encoder_2": TextEncoderAdapter,
                                        "unet": UNetAdapter, "vae": VaeAdapter}


def _load_library_component(folder: Path, entry: list[str]):
    library, class_name = entry
    return getattr(importlib.import_module(library), class_name).from_pretrained(folder)


def _absent(index: dict[str, Any]) -> set[str]:
    """Modules the source pipeline did not have (``[null, null]`` in model_index.json: the SDXL refiner's
    first text encoder and tokenizer)."""
    return {k for k, v in index.items() if isinstance(v, list) and v[0] is None}


def _module_configs(path: Path, manifest: Manifest, modules: tuple[str, ...],
                    index: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each pipeline module's config: from its exported component(s), or from the torch module saved
    beside them when an export left it out (``--component``)."""
    folders = {c.source: name for name, c in manifest.components.items()}
    configs = {}
    for module in modules:
        if module in _absent(index):
            continue
        config = path / folders.get(module, module) / "config.json"
        if not config.is_file():
            raise ExportedModelError(f"{path}: {config.relative_to(path)} is missing; re-run diffship export")
        configs[module] = read_json(config)
    return configs


def _static_note(manifest: Manifest) -> str:
    if not manifest.shapes.static:
        return ""
    p = manifest.shapes.profile
    guidance = " with classifier-free guidance" if p.guidance else ""
    return f" -- this export is static: {p.height}x{p.width} images, batch {p.batch_size}{guidance}"


def _close_all(runners: list[Runner]) -> None:
    for runner in runners:
        runner.close()


@dataclass
class ExportedPipeline:
    """A loaded export as diffship's own tools use it: the diffusers pipeline, and beside it the manifest
    and the runners its adapters call (which diffusers knows nothing of).

    Attributes:
        pipeline: the diffusers pipeline whose models are adapters over the runners.
        manifest: the export's (verified) manifest.
        runners: the runner of each exported component, by component name.
        path: the export folder.
    """

    pipeline: Any
    manifest: Manifest
    runners: dict[str, Runner]
    path: Path

    def close(self) -> None:
        """Close every runner (saving what they keep, e.g. a TensorRT-RTX runtime cache)."""
        self._finalizer()

    def __enter__(self) -> "ExportedPipeline":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __post_init__(self) -> None:
        # Runners close when the pipeline is collected (or at exit) unless closed before.
        self._finalizer = weakref.finalize(self.pipeline, _close_all, list(self.runners.values()))

    def unet_runner(self) -> Runner:
        """The runner that does most of the work (the denoiser), else the first: what reports name."""
        return self.runners.get("unet") or next(iter(self.runners.values()))


def load_pipeline(path: str | Path, *, task: str | None = None, verify: bool = True, **runtime_options: Any):
    """Load an exported folder as a diffusers pipeline.

    Args:
        path: a folder written by ``diffship export``.
        task: ``text2img``, ``img2img`` or ``inpaint`` (default: the task of the exported pipeline).
            All tasks of a family share one export.
        verify: check every file against the sha256 in the manifest first.
        **runtime_options: the backend's runtime options (ONNX Runtime: ``device``, ``threads``,
            ``provider_options``; see its record in :mod:`diffship.backends`).

    Returns:
        An instance of the diffusers pipeline class for ``task``, whose models are adapters over the
        exported components. Schedulers swap as usual (``pipe.scheduler = X.from_config(...)``). Its
        runners are closed when it is garbage-collected (or at exit).

    Raises:
        ExportedModelError: not an export, an unfinished or tampered one.
        MissingBackendError: the backend's runtime package is not installed.
        OptionError: an unknown runtime option or a bad value.
    """
    return open_export(path, task=task, verify=verify, **runtime_options).pipeline


def open_export(path: str | Path, *, task: str | None = None, verify: bool = True,
                **runtime_options: Any) -> ExportedPipeline:
    """Like :func:`load_pipeline`, returning the :class:`ExportedPipeline` (pipeline, manifest, runners),
    which closes its runners as a context manager."""
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    family = family_of(manifest.pipeline_class)
    task = task or family.task_of(manifest.pipeline_class)
    if task not in manifest.tasks:
        raise ExportedModelError(f"{path} cannot run {task!r}; it supports: {', '.join(manifest.tasks)}")
    cls = family.pipeline_class(task)
    index = read_json(path / "model_index.json")
    configs = _module_configs(path, manifest, family.modules, index)
    specs = {s.name: s for s in family.specs(configs) if s.name in manifest.components}
    parts: dict[str, dict[str, tuple[ComponentSpec, Runner]]] = {}
    opened: list[Runner] = []
    try:
        for name, spec in specs.items():
            runner = open_runner(manifest.backend, path / name, manifest.components[name], **runtime_options)
            opened.append(runner)
            runner.shape_note = runner.shape_note or _static_note(manifest)
            parts.setdefault(spec.source, {})[name] = (spec, runner)
        pipe = _build(cls, path, manifest, index, configs, parts)
    except BaseException:
        _close_all(opened)
        raise
    runners = {name: runner for p in parts.values() for name, (_, runner) in p.items()}
    return ExportedPipeline(pipeline=pipe, manifest=manifest, runners=runners, path=path)


def _build(cls: type, path: Path, manifest: Manifest, index: dict[str, Any], configs: dict[str, Any],
           parts: dict[str, dict[str, tuple[ComponentSpec, Runner]]]):
    """The diffusers pipeline ``cls`` over the adapters, with the export's library components
    (tokenizers, scheduler), the modules its source lacked (``[null, null]``) and its pipeline settings."""
    from diffship.reference.pipelines import build_pipeline

    modules: dict[str, Any] = {source: ADAPTERS[source](configs[source], p) for source, p in parts.items()}
    modules.update(dict.fromkeys(_absent(index)))
    for name, entry in index.items():
        if name.startswith("_") or name in manifest.components or name in modules:
            continue
        if not isinstance(entry, list):  # pipeline settings (SDXL: requires_aesthetics_score, ...)
            modules[name] = entry
        elif entry[0] is not None:
            modules[name] = _load_library_component(path / name, entry)
    accepted = inspect.signature(cls.__init__).parameters
    missing = [n for n, p in accepted.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and n != "self"
               and p.default is inspect.Parameter.empty and n not in modules
               and n not in ("safety_checker", "feature_extractor", "image_encoder")]
    if missing:
        raise ExportedModelError(f"{path}: {cls.__name__} needs {', '.join(missing)}, which this export lacks; "
                                 f"re-run diffship export")
    return build_pipeline(cls, modules)

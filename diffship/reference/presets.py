"""Built-in pipelines, built offline, seeded and reproducible, in the diffusers on-disk layout.

* ``tiny``: every part of Stable Diffusion 1.x at toy width -- a CLIP text encoder with the real CLIP
  BPE tokenizer (vocabulary bundled, see ``data/README.md``), a cross-attention
  ``UNet2DConditionModel``, an ``AutoencoderKL`` with the SD scale factor of 8 and SD 1.5's PNDM
  scheduler. Tests and the demo use it.
* ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``, ``tiny-flux-fill``, ``tiny-flux-kontext``: SDXL, SD3.5,
  FLUX.1-dev, FLUX.1 Fill and FLUX.1 Kontext at toy width (tiny-flux's T5 tokenizer is a Unigram model
  over single characters and CLIP's whole words, built offline).
* ``sd15-arch``, ``sdxl-arch``, ``sd3-arch``: the full Stable Diffusion 1.5, SDXL and SD3.5-medium
  architectures (SD 1.5: 860M-parameter UNet, CLIP ViT-L/14 text encoder, SD VAE) with seeded random
  weights, so benchmarks measure real compute without downloads.

A preset is a :class:`Recipe` (component configs as data); everything downstream treats the built
folder like any model folder.
"""

from __future__ import annotations

import os

import gzip
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from diffship._cache import touch
from diffship._files import atomic_folder, cache_dir
from diffship.errors import DiffshipError

SEED = 0
_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode mapping used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49,408-token vocabulary and its BPE merges, built from the bundled merges file."""
    lines = gzip.decompress(_BPE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    }), encoding="utf-8")
    # Round-trip through transformers so the folder holds exactly what this transformers version writes.
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)


#: pieces of the toy T5 vocabulary: T5's special tokens, then single characters, then whole CLIP words.
T5_VOCAB_SIZE = 2000


def t5_pieces() -> list[str]:
    """A SentencePiece-style (``\u2581`` marks a word start) vocabulary for a toy T5: T5's ``<pad>``,
    ``</s>``, ``<unk>`` (ids 0-2), printable ASCII alone and at a word start, then CLIP's whole words
    in merge order (the most frequent first), so prompts tokenize into words as a real T5 does."""
    chars = [chr(c) for c in range(33, 127)]
    pieces = ["<pad>", "</s>", "<unk>", "\u2581", *chars, *("\u2581" + c for c in chars)]
    seen = set(pieces)
    for token in clip_vocab()[0]:
        word = token.removesuffix("</w>")
        if token.endswith("</w>") and len(word) > 1 and word.isascii() and word.isalnum() and "\u2581" + word not in seen:
            seen.add("\u2581" + word)
            pieces.append("\u2581" + word)
            if len(pieces) == T5_VOCAB_SIZE:
                break
    return pieces


def _write_t5_tokenizer(folder: Path, max_length: int) -> None:
    """A T5 tokenizer (Unigram over :func:`t5_pieces`, ``</s>`` appended, as T5's) built offline: the
    ``tokenizer.json`` of a ``T5TokenizerFast``, which transformers 4 and 5 both read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # Equal scores: Viterbi then takes the fewest pieces (whole words where the vocabulary has them).
    model = models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(t5_pieces())], unk_id=2)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                    model_max_length=max_length).save_pretrained(folder)


@dataclass(frozen=True)
class Recipe:
    """How to build one preset: configs of its modules, as data.

    Attributes:
        name: preset name (``diffship export NAME ...``).
        version: bump when the architecture or seeding changes, so stale caches are not reused.
        text_encoder: ``CLIPTextConfig`` arguments (vocabulary and special tokens come from the tokenizer).
        unet: ``UNet2DConditionModel`` arguments (None where ``transformer`` is the denoiser).
        vae: ``AutoencoderKL`` arguments.
        scheduler: arguments of ``scheduler_class``.
        pipeline: the diffusers pipeline class.
        text_encoder_2: SDXL's second text encoder (``CLIPTextModelWithProjection``), with its own
            tokenizer (padding with ``!``, as SDXL's does); None for SD.
        scheduler_class: the diffusers scheduler class.
        text_encoder_class: ``CLIPTextModel``, or ``CLIPTextModelWithProjection`` (SD3's CLIP-L).
        transformer: arguments of ``transformer_class`` (SD3's MMDiT, Flux's transformer).
        transformer_class: ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``.
        t5: ``T5Config`` arguments of the T5 encoder (Flux's ``text_encoder_2``, SD3's ``text_encoder_3``);
            None: no T5 (an SD3 pipeline then conditions on CLIP alone).
        t5_max_length: the T5 tokenizer's ``model_max_length`` (FLUX.1-dev: 512; SD3: 256, its max_sequence_length).
        streamed: modules built tensor by tensor on disk (:mod:`~diffship.reference.streamed`), never whole
            in memory, with their weights stored in ``streamed_dtype``.
    """

    name: str
    version: int
    text_encoder: dict[str, Any]
    unet: dict[str, Any] | None
    vae: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(_SD_SCHEDULER))
    pipeline: str = "StableDiffusionPipeline"
    text_encoder_2: dict[str, Any] | None = None
    scheduler_class: str = "PNDMScheduler"
    text_encoder_class: str = "CLIPTextModel"
    transformer: dict[str, Any] | None = None
    transformer_class: str = "SD3Transformer2DModel"
    t5: dict[str, Any] | None = None
    t5_max_length: int = 512
    streamed: tuple[str, ...] = ()
    streamed_dtype: str = "bfloat16"


#: SD 1.5's scheduler (PNDM, scaled-linear betas).
_SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                     set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
_SD_VAE_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
#: SDXL's scheduler (Euler, scaled-linear betas, leading timesteps).
_SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                       steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
#: SDXL's UNet layout: no attention at the first level, then 2 and 10 transformer layers per block.
_SDXL_UNET_BLOCKS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         use_linear_projection=True, addition_embed_type="text_time")
#: the SDXL VAE: SD's architecture, another latent scale, run in fp32 by diffusers (it overflows fp16).
_SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                 block_out_channels=(128, 256, 512, 512), norm_num_groups=32, scaling_factor=0.13025,
                 force_upcast=True, **_SD_VAE_BLOCKS)
#: SD3's VAE: 16 latent channels, no quant convolutions, a shift as well as a scale.
_SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305, **_SD_VAE_BLOCKS)
#: Flux's VAE: 16 latent channels, no quant convolutions, its own shift and scale.
_FLUX_VAE = dict(_SD3_VAE, shift_factor=0.1159, scaling_factor=0.3611)
#: Flux's scheduler: flow matching with the resolution-dependent shift (``mu`` from the image's token count).
_FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096)
_VIT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)

# FLUX.1-dev at toy width: CLIP-L (pooled output), a T5 encoder, the Flux transformer (double- and
# single-stream blocks, 3-axis RoPE, guidance embedding), the 16-channel VAE. Its VAE has two levels
# (scale 2) and no mid-block attention: diffusers' Flux pipelines default to 128 latent pixels a side,
# which this keeps at 256 px without a 16384-token attention.
_TINY_FLUX = Recipe(
    name="tiny-flux", version=1, pipeline="FluxPipeline", scheduler_class="FlowMatchEulerDiscreteScheduler",
    scheduler=_FLUX_SCHEDULER,
    text_encoder=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32, hidden_act="gelu"),
    t5=dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True),
    unet=None, transformer_class="FluxTransformer2DModel",
    transformer=dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=2,
                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                     guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
    vae=dict(_FLUX_VAE, layers_per_block=1, sample_size=64, block_out_channels=(32, 32), mid_block_add_attention=False,
             norm_num_groups=8,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
)

# FLUX.1-Fill-dev at the same toy width: its transformer takes the packed latents, the packed masked-image
# latents and the packed mask (64 + 64 + 4 x 2 x 2 channels with tiny-flux's scale-2 VAE) and returns 64.
_TINY_FLUX_FILL = replace(_TINY_FLUX, name="tiny-flux-fill", pipeline="FluxFillPipeline",
                          transformer={**_TINY_FLUX.transformer, "in_channels": 144, "out_channels": 64})
# FLUX.1 Kontext-dev's architecture is FLUX.1-dev's: only the pipeline class differs.
_TINY_FLUX_KONTEXT = replace(_TINY_FLUX, name="tiny-flux-kontext", pipeline="FluxKontextPipeline")


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="tiny", version=2,
        text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          projection_dim=32),
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
                 block_out_channels=(32, 32, 64, 64), norm_num_groups=32, **_SD_VAE_BLOCKS),
    ),
    # runwayml/stable-diffusion-v1-5's configs: CLIP ViT-L/14 text tower, the 860M UNet, the SD VAE.
    Recipe(
        name="sd15-arch", version=2,
        text_encoder=_VIT_L,
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                 block_out_channels=(128, 256, 512, 512), norm_num_groups=32, **_SD_VAE_BLOCKS),
    ),
    # SDXL at toy width (two text encoders, added text/time conditions, the SDXL VAE's settings).
    Recipe(
        name="tiny-sdxl", version=2, pipeline="StableDiffusionXLPipeline", scheduler_class="EulerDiscreteScheduler",
        scheduler=_SDXL_SCHEDULER,
        text_encoder=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                          projection_dim=32, hidden_act="gelu"),
        text_encoder_2=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                            projection_dim=32, hidden_act="gelu"),
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                  projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                  attention_head_dim=(2, 4), norm_num_groups=32),
        vae=dict(_SDXL_VAE, layers_per_block=1, sample_size=64, block_out_channels=(32, 32, 64, 64)),
    ),
    # SD3.5 at toy width: CLIP-L and CLIP-G with projection, a T5 encoder, an MMDiT with qk RMS-norm and a
    # dual-attention layer (SD3.5-medium's features), the 16-channel VAE, flow matching with shift 3.
    Recipe(
        name="tiny-sd3", version=2, pipeline="StableDiffusion3Pipeline", t5_max_length=256,
        t5=dict(d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True),
        scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler=dict(num_train_timesteps=1000, shift=3.0),
        text_encoder_class="CLIPTextModelWithProjection",
        text_encoder=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          projection_dim=32, hidden_act="gelu"),
        text_encoder_2=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            projection_dim=32, hidden_act="gelu"),
        unet=None,
        transformer=dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                         pooled_projection_dim=64, pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,)),
        vae=dict(_SD3_VAE, layers_per_block=1, sample_size=64, block_out_channels=(32, 32, 64, 64)),
    ),
    _TINY_FLUX,
    _TINY_FLUX_FILL,
    _TINY_FLUX_KONTEXT,
    # stabilityai/stable-diffusion-xl-base-1.0's configs: CLIP ViT-L and OpenCLIP bigG text towers, the
    # 2.6B-parameter UNet, the SDXL VAE.
    Recipe(
        name="sdxl-arch", version=2, pipeline="StableDiffusionXLPipeline", scheduler_class="EulerDiscreteScheduler",
        scheduler=_SDXL_SCHEDULER,
        text_encoder=_VIT_L,
        text_encoder_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu"),
        unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                  attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
                  **_SDXL_UNET_BLOCKS),
        vae=_SDXL_VAE,
    ),
    # stabilityai/stable-diffusion-3.5-medium's configs without T5 (diffusers then conditions on CLIP alone,
    # padding to the MMDiT's 4096-wide context): CLIP-L and OpenCLIP bigG with projection, the
    # 2.2B-parameter MMDiT-X (qk RMS-norm, dual attention in its first 13 layers), the SD3 VAE.
    Recipe(
        name="sd3-arch", version=1, pipeline="StableDiffusion3Pipeline", t5_max_length=256,
        scheduler_class="FlowMatchEulerDiscreteScheduler", scheduler=dict(num_train_timesteps=1000, shift=3.0),
        text_encoder_class="CLIPTextModelWithProjection",
        text_encoder=_VIT_L,
        text_encoder_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu"),
        unet=None,
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
        vae=dict(_SD3_VAE, layers_per_block=2, sample_size=1024, block_out_channels=(128, 256, 512, 512)),
    ),
    # black-forest-labs/FLUX.1-dev's configs: CLIP-L, T5-v1.1-XXL (the toy T5 vocabulary: its tokenizer is
    # built offline), the 12B-parameter transformer, the Flux VAE. The transformer and T5 (33 GB in bf16, as
    # FLUX.1-dev ships them) are written tensor by tensor; for the export-memory work.
    Recipe(
        name="flux-arch", version=1, pipeline="FluxPipeline", scheduler_class="FlowMatchEulerDiscreteScheduler",
        scheduler=_FLUX_SCHEDULER, text_encoder=_VIT_L,
        t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                is_gated_act=True, tie_word_embeddings=False),
        unet=None, transformer_class="FluxTransformer2DModel",
        transformer=dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        vae=dict(_FLUX_VAE, layers_per_block=2, sample_size=1024, block_out_channels=(128, 256, 512, 512)),
        streamed=("transformer", "text_encoder_2"),
    ),
)}


def build_preset(recipe: Recipe, out: Path) -> Path:
    """Build ``recipe`` into ``out`` (diffusers layout). Same files, bit for bit, on every build."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffship.reference.pipelines import build_pipeline
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5TokenizerFast)

    out = Path(out)
    # wait: another process building the same preset finishes first, and its folder is then used.
    with atomic_folder(out, wait=True) as tmp:
        modules: dict[str, Any] = {}
        # One seed per module, so changing one module's config leaves the others' weights alone.
        first = CLIPTextModelWithProjection if recipe.text_encoder_class == "CLIPTextModelWithProjection" else CLIPTextModel
        encoders = [("text_encoder", "tokenizer", first, recipe.text_encoder, "<|endoftext|>", SEED)]
        if recipe.text_encoder_2 is not None:
            encoders.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, recipe.text_encoder_2, "!", SEED + 3))
        for name, tok_name, cls, config, pad, seed in encoders:
            _write_tokenizer(tmp / tok_name, pad_token=pad)
            tokenizer = modules[tok_name] = CLIPTokenizer.from_pretrained(tmp / tok_name)
            torch.manual_seed(seed)
            modules[name] = cls(CLIPTextConfig(**{
                "vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
                "hidden_act": "quick_gelu", "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id, **config})).eval()
        # T5 is Flux's second encoder and SD3's third.
        t5, t5_tokenizer = ("text_encoder_2", "tokenizer_2") if "Flux" in recipe.pipeline else ("text_encoder_3", "tokenizer_3")
        if recipe.t5 is not None:
            _write_t5_tokenizer(tmp / t5_tokenizer, recipe.t5_max_length)
            tokenizer = modules[t5_tokenizer] = T5TokenizerFast.from_pretrained(tmp / t5_tokenizer)
            torch.manual_seed(SEED + 4)
            with _device_for(recipe, t5):
                modules[t5] = T5EncoderModel(T5Config(**{
                    "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                    "eos_token_id": tokenizer.eos_token_id, **recipe.t5})).eval()
        elif recipe.transformer is not None:
            modules.update({t5: None, t5_tokenizer: None})  # diffusers conditions SD3 on CLIP alone
        torch.manual_seed(SEED + 1)
        if recipe.transformer is not None:
            with _device_for(recipe, "transformer"):
                modules["transformer"] = getattr(diffusers, recipe.transformer_class)(**recipe.transformer).eval()
        else:
            modules["unet"] = UNet2DConditionModel(**recipe.unet).eval()
        torch.manual_seed(SEED + 2)
        modules["vae"] = AutoencoderKL(**recipe.vae).eval()
        modules["scheduler"] = getattr(diffusers, recipe.scheduler_class)(**recipe.scheduler)
        streamed = {name: modules.pop(name) for name in recipe.streamed}  # on the meta device
        pipe = build_pipeline(getattr(diffusers, recipe.pipeline), {**modules, **dict.fromkeys(streamed)})
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, *_ in encoders:
            _with_text_model_prefix(tmp / name / "model.safetensors")
        if streamed:
            _write_streamed_modules(tmp, streamed, recipe.streamed_dtype)
    return out


def _device_for(recipe: Recipe, name: str):
    """The meta device for a module the recipe streams (shapes only), else no change."""
    import contextlib

    import torch

    return torch.device("meta") if name in recipe.streamed else contextlib.nullcontext()


def _write_streamed_modules(folder: Path, streamed: dict[str, Any], dtype: str) -> None:
    """Write each meta-device module tensor by tensor and enter it in ``model_index.json`` (which the
    pipeline saved with the module absent)."""
    from diffship.reference.streamed import write_streamed

    index = json.loads((folder / "model_index.json").read_text())
    for i, (name, module) in enumerate(streamed.items()):
        library = "diffusers" if type(module).__module__.startswith("diffusers") else "transformers"
        write_streamed(module, folder / name, library, dtype, seed=SEED + 10 + i)
        index[name] = [library, type(module).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _with_text_model_prefix(weights: Path) -> None:
    """Rewrite a CLIP text encoder's weights with the ``text_model.`` key prefix.

    transformers 5 saves the keys without it; transformers 4 (which optimum-onnx and optimum-intel load)
    then finds none of its weights and initializes the model at random, while both versions read the
    prefixed layout -- the one Stable Diffusion's own checkpoints use.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    renamed = weights.with_name(weights.name + ".renamed")
    save_file({k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
               for k, v in state.items()}, renamed, metadata={"format": "pt"})
    os.replace(renamed, weights)


def preset_path(name: str) -> Path:
    """The cached folder of preset ``name``, built on first use."""
    recipe = RECIPES[name]
    path = cache_dir() / f"{recipe.name}-v{recipe.version}"
    if (path / "model_index.json").is_file():
        touch(path)  # last use, for `diffship cache prune --older-than`
    else:
        try:
            build_preset(recipe, path)
        except (DiffshipError, OSError):
            if not (path / "model_index.json").is_file():  # not just another process finishing first
                raise
    return path


def build_tiny(out: Path) -> Path:
    """Build the tiny pipeline into ``out``."""
    return build_preset(RECIPES["tiny"], out)


def tiny_path() -> Path:
    """The cached tiny pipeline folder, built on first use."""
    return preset_path("tiny")

"""Exported pipelines behave like the eager diffusers pipeline for everything a diffusers user does.

Every test takes ``exported`` (so it runs once per backend) and compares the pipeline returned by
:func:`load_pipeline` -- or its components -- with the eager tiny pipeline under the same seed. The
fp32 export matches eager to about 1e-5, so tolerances are tight; helpers also check that the eager
reference is not degenerate and, where it matters, that the argument under test changes the eager
output (so an export that ignored it could not pass).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from diffship.errors import ShapeError
from diffship.runtimes.adapters import TextEncoderAdapter, UNetAdapter, VaeAdapter
from diffship.runtimes.pipeline import load_pipeline

STEPS = 3
PROMPT = "a photo of a cat"
ATOL = 1e-4  # images in [0, 1] (np/pt) or [-1, 1] (decoder output)
LATENT_TOL = {"atol": 1e-4, "rtol": 1e-4}  # latents reach ~10 in magnitude

#: the tiny pipeline's scheduler is PNDM (diffship/reference/presets.py); test_compatibles_are_parametrized checks it.
COMPATIBLE_SCHEDULERS = sorted(PNDMScheduler().compatibles, key=lambda c: c.__name__)


# --- helpers ----------------------------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def as_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Image.Image):
        return np.stack([np.asarray(im) for im in x])
    return np.asarray(x)


def assert_match(actual, expected, *, atol: float = ATOL, rtol: float = 0.0) -> None:
    """``actual`` (exported) equals ``expected`` (eager) within tolerance; the reference is not flat."""
    actual, expected = as_np(actual), as_np(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != eager {expected.shape}"
    assert np.isfinite(actual).all(), "exported output has non-finite values"
    assert float(np.ptp(expected)) > 1e-3, "eager reference is constant: the comparison would prove nothing"
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def assert_differs(a, b, min_diff: float = 1e-3) -> None:
    """The argument under test changes the output (so ignoring it would be caught)."""
    diff = float(np.abs(as_np(a).astype(np.float64) - as_np(b).astype(np.float64)).max())
    assert diff > min_diff, f"outputs differ by only {diff}; the comparison cannot detect the argument being ignored"


def call(pipe, **kwargs):
    """``pipe(...)`` with the test defaults: 3 steps, seed 0, numpy output."""
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, "output_type": "np", **kwargs}
    kwargs.setdefault("generator", gen(0))
    return pipe(**kwargs)


def images(pipe, **kwargs):
    return call(pipe, **kwargs).images


def rebuild(pipe, cls=None, scheduler=None):
    """A new pipeline of ``cls`` over ``pipe``'s components, with its own scheduler (nothing shared mutates)."""
    components = dict(pipe.components)
    sched = scheduler or type(pipe.scheduler)
    # SDE schedulers draw Brownian noise from their own seed (random unless set): fix it for a fair comparison.
    extra = {"noise_sampler_seed": 0} if "noise_sampler_seed" in inspect.signature(sched.__init__).parameters else {}
    components["scheduler"] = sched.from_config(pipe.scheduler.config, **extra)
    new = (cls or type(pipe))(**components, requires_safety_checker=False)
    new.set_progress_bar_config(disable=True)
    return new


def init_image(height: int = 64, width: int = 64) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 127 // (height + width)], axis=-1)
    rgb = rgb + np.random.RandomState(0).randint(0, 40, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def mask_image(height: int = 64, width: int = 64) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask, "L")


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    """``loaded(path, task=None)``: load_pipeline, cached for the module (callers must not mutate it)."""
    cache: dict[tuple[str, str | None], object] = {}

    def get(path, task=None):
        key = (str(path), task)
        if key not in cache:
            pipe = load_pipeline(path, task=task)
            pipe.set_progress_bar_config(disable=True)
            cache[key] = pipe
        return cache[key]

    return get


@pytest.fixture
def exp(exported, loaded):
    """The exported text2img pipeline (shared within the module: do not modify it)."""
    return loaded(exported)


@pytest.fixture(scope="module")
def eager(tiny_pipe):
    """An eager text2img pipeline over tiny_pipe's modules, with its own scheduler."""
    return rebuild(tiny_pipe)


@pytest.fixture
def unet_calls(exp, monkeypatch):
    """The batch sizes of every exported UNet run during the test."""
    runner = exp.unet.runner
    batches: list[int] = []
    original = runner.infer

    def spy(inputs, *args, **kwargs):
        batches.append(int(inputs["sample"].shape[0]))
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(runner, "infer", spy)
    return batches


# --- loading ----------------------------------------------------------------------------------------------


def test_load_returns_diffusers_pipeline_with_adapters(exp, eager):
    assert type(exp) is StableDiffusionPipeline
    assert isinstance(exp.text_encoder, TextEncoderAdapter)
    assert isinstance(exp.unet, UNetAdapter)
    assert isinstance(exp.vae, VaeAdapter)
    assert type(exp.tokenizer) is type(eager.tokenizer)
    assert type(exp.scheduler) is type(eager.scheduler)
    assert dict(exp.scheduler.config) == dict(eager.scheduler.config)
    assert exp.vae_scale_factor == eager.vae_scale_factor


# --- text2img call arguments ------------------------------------------------------------------------------


def test_default_call(exp, eager):
    out = images(exp)
    assert out.shape == (1, 64, 64, 3)
    assert_match(out, images(eager))


def test_negative_prompt_str(exp, eager):
    expected = images(eager, negative_prompt="blurry, low quality")
    assert_differs(expected, images(eager))
    assert_match(images(exp, negative_prompt="blurry, low quality"), expected)


def test_prompt_and_negative_prompt_lists(exp, eager):
    kwargs = {"prompt": ["a photo of a cat", "a painting of a dog"], "negative_prompt": ["blurry", "cartoon"]}
    expected = images(eager, **kwargs)
    out = images(exp, **kwargs)
    assert out.shape == (2, 64, 64, 3)
    assert_differs(expected[0], expected[1])
    assert_match(out, expected)


@pytest.mark.parametrize("steps", [2, 4])
def test_num_inference_steps(exp, eager, unet_calls, steps):
    expected = images(eager, num_inference_steps=steps)
    out = images(exp, num_inference_steps=steps)
    # One UNet evaluation per timestep (PNDM's PLMS schedule has one timestep more than steps).
    assert torch.equal(exp.scheduler.timesteps, eager.scheduler.timesteps)
    assert steps <= len(unet_calls) == len(exp.scheduler.timesteps)
    assert_match(out, expected)


@pytest.mark.parametrize("guidance_scale, unet_batch", [(7.5, 2), (1.0, 1)])
def test_guidance_scale(exp, eager, unet_calls, guidance_scale, unet_batch):
    expected = images(eager, guidance_scale=guidance_scale)
    out = images(exp, guidance_scale=guidance_scale)
    # Guidance doubles the UNet batch (uncond + cond); guidance_scale=1.0 turns it off.
    assert unet_calls == [unet_batch] * len(exp.scheduler.timesteps)
    assert_match(out, expected)


def test_guidance_scale_changes_result(exp, eager):
    expected = images(eager, guidance_scale=3.0)
    assert_differs(expected, images(eager, guidance_scale=7.5))
    assert_match(images(exp, guidance_scale=3.0), expected)


@pytest.mark.parametrize("height, width", [(96, 64), (64, 128)])
def test_height_width(exp, eager, height, width):
    expected = images(eager, height=height, width=width)
    out = images(exp, height=height, width=width)
    assert out.shape == (1, height, width, 3)
    assert_match(out, expected)


def test_num_images_per_prompt(exp, eager, unet_calls):
    kwargs = {"num_images_per_prompt": 2, "negative_prompt": "blurry"}
    expected = images(eager, **kwargs)
    out = images(exp, **kwargs)
    assert out.shape == (2, 64, 64, 3)
    assert unet_calls == [4] * len(exp.scheduler.timesteps)
    assert_differs(expected[0], expected[1])
    assert_match(out, expected)


def test_prompt_list_with_num_images_per_prompt(exp, eager):
    kwargs = {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2}
    expected = images(eager, **kwargs)
    out = images(exp, **kwargs)
    assert out.shape == (4, 64, 64, 3)
    assert_match(out, expected)


def test_generator_seed_matters(exp, eager):
    expected = images(eager, generator=gen(1))
    assert_differs(expected, images(eager, generator=gen(0)))
    assert_match(images(exp, generator=gen(1)), expected)


def test_generator_list(exp, eager):
    kwargs = {"prompt": [PROMPT, PROMPT]}
    expected = images(eager, generator=[gen(3), gen(4)], **kwargs)
    out = images(exp, generator=[gen(3), gen(4)], **kwargs)
    assert_differs(expected[0], expected[1])
    assert_match(out, expected)
    # The first image of a list of generators is the image of that generator alone.
    assert_match(out[0], images(eager, generator=gen(3))[0])


def test_latents_passed_in(exp, eager):
    latents = torch.randn((1, 4, 8, 8), generator=gen(42))
    expected = images(eager, latents=latents.clone())
    assert_differs(expected, images(eager))
    assert_match(images(exp, latents=latents.clone()), expected)


def test_latents_passed_in_non_default_size(exp, eager):
    latents = torch.randn((2, 4, 12, 8), generator=gen(7))
    kwargs = {"prompt": ["a cat", "a dog"], "height": 96, "width": 64}
    expected = images(eager, latents=latents.clone(), **kwargs)
    out = images(exp, latents=latents.clone(), **kwargs)
    assert out.shape == (2, 96, 64, 3)
    assert_match(out, expected)


def test_output_type_pil(exp, eager):
    expected = images(eager, output_type="pil")
    out = images(exp, output_type="pil")
    assert isinstance(out, list) and len(out) == 1
    assert isinstance(out[0], Image.Image)
    assert out[0].size == (64, 64) and out[0].mode == "RGB"
    # uint8: a value within 1e-5 of a rounding boundary may land one level off.
    a, e = as_np(out).astype(np.int16), as_np(expected).astype(np.int16)
    assert int(np.abs(a - e).max()) <= 1
    assert float((a != e).mean()) < 0.01
    assert np.ptp(e) > 10


def test_output_type_np(exp, eager):
    out = images(exp, output_type="np")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert_match(out, images(eager, output_type="np"))


def test_output_type_pt(exp, eager):
    out = images(exp, output_type="pt")
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 3, 64, 64) and out.dtype == torch.float32
    assert_match(out, images(eager, output_type="pt"))


def test_output_type_latent(exp, eager, unet_calls):
    out = images(exp, output_type="latent")
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 4, 8, 8)
    assert_match(out, images(eager, output_type="latent"), **LATENT_TOL)


def test_return_dict_false(exp, eager):
    out = call(exp, return_dict=False)
    expected = call(eager, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2
    images_, nsfw = out
    assert nsfw is None  # no safety checker
    assert_match(images_, expected[0])


def test_callback_on_step_end(exp, eager):
    def make_callback(record):
        def callback(pipe, step, timestep, callback_kwargs):
            latents = callback_kwargs["latents"]
            record.append((step, float(timestep), tuple(latents.shape)))
            if step == 0:
                latents = latents * 0.5  # a user edit of the latents mid-run
            return {"latents": latents}

        return callback

    eager_steps: list = []
    exp_steps: list = []
    expected = images(eager, callback_on_step_end=make_callback(eager_steps),
                      callback_on_step_end_tensor_inputs=["latents"])
    out = images(exp, callback_on_step_end=make_callback(exp_steps), callback_on_step_end_tensor_inputs=["latents"])
    assert [s for s, _, _ in exp_steps] == list(range(len(exp.scheduler.timesteps)))  # once per step
    assert exp_steps == eager_steps
    assert_differs(expected, images(eager))  # the callback's edit took effect
    assert_match(out, expected)


# --- schedulers -------------------------------------------------------------------------------------------


def test_euler_scheduler_swap(exp, eager):
    pipe = rebuild(exp)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    reference = rebuild(eager)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    expected = images(reference)
    assert_differs(expected, images(eager))  # not still running PNDM
    assert_match(images(pipe), expected)


def test_compatibles_are_parametrized(exp, eager):
    assert isinstance(eager.scheduler, PNDMScheduler)
    names = sorted(c.__name__ for c in exp.scheduler.compatibles)
    assert names == [c.__name__ for c in COMPATIBLE_SCHEDULERS]
    assert names == sorted(c.__name__ for c in eager.scheduler.compatibles)


@pytest.mark.parametrize("scheduler_cls", COMPATIBLE_SCHEDULERS, ids=lambda c: c.__name__)
def test_compatible_scheduler(exp, eager, scheduler_cls):
    try:
        reference = rebuild(eager, scheduler=scheduler_cls)
        expected = images(reference)
    except Exception as exc:  # e.g. scipy- or torchsde-based schedulers without their package
        pytest.skip(f"{scheduler_cls.__name__} fails in eager diffusers here: {type(exc).__name__}: {exc}")
    pipe = rebuild(exp, scheduler=scheduler_cls)
    assert type(pipe.scheduler) is scheduler_cls
    assert_match(images(pipe), expected)


# --- other tasks from the same export ---------------------------------------------------------------------


def _img2img(pipe, **kwargs):
    return images(pipe, image=init_image(), strength=0.75, num_inference_steps=4, **kwargs)


def _inpaint(pipe, **kwargs):
    return images(pipe, image=init_image(), mask_image=mask_image(), strength=1.0, num_inference_steps=STEPS,
                  **kwargs)


def test_img2img_task(exported, loaded, tiny_pipe):
    pipe = loaded(exported, "img2img")
    assert type(pipe) is StableDiffusionImg2ImgPipeline
    reference = rebuild(tiny_pipe, StableDiffusionImg2ImgPipeline)
    expected = _img2img(reference)
    assert_differs(expected, _img2img(reference, generator=gen(5)))
    assert_match(_img2img(pipe), expected)


def test_img2img_batch_and_generator_list(exported, loaded, tiny_pipe):
    pipe = loaded(exported, "img2img")
    reference = rebuild(tiny_pipe, StableDiffusionImg2ImgPipeline)
    kwargs = {"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "cartoon"]}
    expected = _img2img(reference, generator=[gen(1), gen(2)], **kwargs)
    out = _img2img(pipe, generator=[gen(1), gen(2)], **kwargs)
    assert out.shape == (2, 64, 64, 3)
    assert_match(out, expected)


def test_inpaint_task(exported, loaded, tiny_pipe):
    pipe = loaded(exported, "inpaint")
    assert type(pipe) is StableDiffusionInpaintPipeline
    reference = rebuild(tiny_pipe, StableDiffusionInpaintPipeline)
    expected = _inpaint(reference)
    assert_match(_inpaint(pipe), expected)


@pytest.mark.parametrize("cls, run", [(StableDiffusionImg2ImgPipeline, _img2img),
                                      (StableDiffusionInpaintPipeline, _inpaint)],
                         ids=["img2img", "inpaint"])
def test_task_pipeline_from_text2img_components(exp, tiny_pipe, cls, run):
    pipe = cls(**exp.components)  # what diffusers documents for reusing a pipeline's models
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet is exp.unet and pipe.vae is exp.vae
    reference = rebuild(tiny_pipe, cls)  # its own scheduler: tiny_pipe is shared
    expected = run(reference)
    assert_match(run(pipe), expected)


# --- components used directly -----------------------------------------------------------------------------


def seed_snippet(pipeline, num_inference_steps: int = STEPS, latent_size: int = 64):
    """The "Use StableDiffusionPipeline's internal components directly" snippet, on the CPU, fewer steps."""
    device = "cpu"
    generator = torch.Generator(device).manual_seed(1024)
    positive_prompt = ["a painting of a super cute cat"]
    negative_prompt = [""] * len(positive_prompt)
    guidance_scale = 6.5

    model = pipeline.unet
    tokenizer = pipeline.tokenizer
    text_encoder = pipeline.text_encoder
    image_processor = pipeline.image_processor
    vae = pipeline.vae

    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)

    positive_text_input = tokenizer(
        positive_prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )
    positive_text_embeddings = text_encoder(positive_text_input.input_ids.to(device))[0]
    negative_text_input = tokenizer(
        negative_prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )
    negative_text_embeddings = text_encoder(negative_text_input.input_ids.to(device))[0]
    text_embeddings = torch.cat([positive_text_embeddings, negative_text_embeddings])

    latent = torch.randn((1, 4, latent_size, latent_size), generator=generator, device=device)
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            noisy_residual_cond, noisy_residual_uncond = model(
                torch.cat([latent, latent]), t, encoder_hidden_states=text_embeddings,
            ).sample.chunk(2)
        noisy_residual = noisy_residual_cond + guidance_scale * (noisy_residual_cond - noisy_residual_uncond)
        sched_output = scheduler.step(noisy_residual, t, latent)
        latent = sched_output.prev_sample

    with torch.no_grad():
        image = vae.decode(latent / vae.config.scaling_factor).sample
    pil = image_processor.postprocess(image, output_type="pil", do_denormalize=[True])[0]
    return {"text_embeddings": text_embeddings.detach(), "latent": latent, "image": image, "pil": pil}


@pytest.mark.parametrize("latent_size", [8, 12])
def test_seed_snippet_components(exp, eager, latent_size):
    # The snippet's (1, 4, 64, 64) latent is SD 1.5's 512 px; the tiny pipeline's native size is 8 (64 px).
    expected = seed_snippet(eager, latent_size=latent_size)
    out = seed_snippet(exp, latent_size=latent_size)
    assert_match(out["text_embeddings"], expected["text_embeddings"], atol=1e-5)
    assert_match(out["latent"], expected["latent"], **LATENT_TOL)
    assert_match(out["image"], expected["image"], atol=2e-4)
    assert isinstance(out["pil"], Image.Image)
    assert out["pil"].size == (8 * latent_size, 8 * latent_size)
    assert int(np.abs(as_np([out["pil"]]).astype(int) - as_np([expected["pil"]]).astype(int)).max()) <= 1


def _ids(pipe, prompts):
    return pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


def test_text_encoder_outputs(exp, eager):
    ids = _ids(eager, ["a cat", "a photo of a dog on a sofa"])
    with torch.no_grad():
        expected = eager.text_encoder(ids)
    out = exp.text_encoder(ids)
    assert_match(out.last_hidden_state, expected.last_hidden_state, atol=1e-5)
    assert_match(out.pooler_output, expected.pooler_output, atol=1e-5)
    assert_match(out[0], expected[0], atol=1e-5)
    tup = exp.text_encoder(ids, return_dict=False)
    assert isinstance(tup, tuple)
    with torch.no_grad():
        eager_tup = eager.text_encoder(ids, return_dict=False)
    assert len(tup) == len(eager_tup) == 2
    for a, e in zip(tup, eager_tup):
        assert_match(a, e, atol=1e-5)
    # An all-ones attention mask is what the pipeline would pass; it changes nothing.
    assert_match(exp.text_encoder(ids, attention_mask=torch.ones_like(ids))[0], expected[0], atol=1e-5)


@pytest.mark.parametrize("timestep", [torch.tensor(500), 500, torch.tensor([500.0]), torch.tensor([100, 900])],
                         ids=["0d-tensor", "int", "1-element", "per-sample"])
def test_unet_call(exp, eager, timestep):
    sample = torch.randn((2, 4, 8, 8), generator=gen(1))
    emb = torch.randn((2, 77, 32), generator=gen(2))
    with torch.no_grad():
        expected = eager.unet(sample, timestep, encoder_hidden_states=emb)
        eager_tuple = eager.unet(sample, timestep, emb, return_dict=False)
    out = exp.unet(sample, timestep, encoder_hidden_states=emb)
    assert type(out) is type(expected)
    assert_match(out.sample, expected.sample)
    tup = exp.unet(sample, timestep, emb, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(eager_tuple) == 1
    assert_match(tup[0], eager_tuple[0])


def test_vae_decode(exp, eager):
    z = torch.randn((2, 4, 12, 8), generator=gen(3))
    with torch.no_grad():
        expected = eager.vae.decode(z / eager.vae.config.scaling_factor).sample
        eager_tuple = eager.vae.decode(z, return_dict=False)
    out = exp.vae.decode(z / exp.vae.config.scaling_factor)
    assert type(out).__name__ == "DecoderOutput"
    assert out.sample.shape == (2, 3, 96, 64)
    assert_match(out.sample, expected, atol=2e-4)
    tup = exp.vae.decode(z, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(eager_tuple) == 1
    assert_match(tup[0], eager_tuple[0], atol=2e-4)


def test_vae_encode(exp, eager):
    x = torch.from_numpy(np.asarray(init_image(96, 64), np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    x = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        expected = eager.vae.encode(x)
        eager_tuple = eager.vae.encode(x, return_dict=False)
    out = exp.vae.encode(x)
    assert type(out) is type(expected)
    dist, ref = out.latent_dist, expected.latent_dist
    assert_match(dist.mean, ref.mean)
    assert_match(dist.mode(), ref.mode())
    assert_match(dist.std, ref.std)
    sample = dist.sample(gen(9))
    expected_sample = ref.sample(gen(9))
    assert sample.shape == (2, 4, 12, 8)
    assert_differs(expected_sample, ref.sample(gen(10)), min_diff=1e-4)
    assert_match(sample, expected_sample)
    tup = exp.vae.encode(x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(eager_tuple) == 1
    assert_match(tup[0].sample(gen(9)), eager_tuple[0].sample(gen(9)))


def test_config_dtype_device(exp, eager):
    assert exp.unet.config.in_channels == eager.unet.config.in_channels == 4
    assert exp.unet.config.sample_size == eager.unet.config.sample_size
    assert exp.unet.config.cross_attention_dim == eager.unet.config.cross_attention_dim
    assert exp.vae.config.scaling_factor == eager.vae.config.scaling_factor
    assert exp.vae.config.latent_channels == eager.vae.config.latent_channels
    assert list(exp.vae.config.block_out_channels) == list(eager.vae.config.block_out_channels)
    assert exp.text_encoder.config["hidden_size"] == eager.text_encoder.config.hidden_size
    assert exp.text_encoder.dtype == eager.text_encoder.dtype == torch.float32
    assert exp.unet.dtype == eager.unet.dtype == torch.float32
    assert exp.vae.dtype == eager.vae.dtype == torch.float32
    assert exp.device == eager.device == torch.device("cpu")
    assert exp.dtype == eager.dtype == torch.float32


def test_to_cpu_returns_working_pipeline(exp, eager):
    pipe = rebuild(exp)
    moved = pipe.to("cpu")
    assert isinstance(moved, StableDiffusionPipeline)
    assert moved.device == torch.device("cpu")
    assert_match(images(moved), images(eager))


# --- unsupported arguments --------------------------------------------------------------------------------


def test_clip_skip_is_rejected(exp):
    # The export has no hidden-state outputs: a clear ShapeError, not a wrong image or an AttributeError.
    with pytest.raises(ShapeError, match="clip_skip"):
        images(exp, clip_skip=1)


def test_output_hidden_states_is_rejected(exp):
    ids = _ids(exp, ["a cat"])
    with pytest.raises(ShapeError, match="clip_skip|hidden"):
        exp.text_encoder(ids, output_hidden_states=True)


def test_partial_attention_mask_is_rejected(exp):
    ids = _ids(exp, ["a cat"])
    mask = torch.ones_like(ids)
    mask[:, 10:] = 0
    with pytest.raises(ShapeError, match="attention_mask"):
        exp.text_encoder(ids, attention_mask=mask)


def test_unet_cross_attention_kwargs_is_rejected(exp):
    sample, emb = torch.randn((1, 4, 8, 8), generator=gen(1)), torch.randn((1, 77, 32), generator=gen(2))
    with pytest.raises(ShapeError, match="cross_attention_kwargs"):
        exp.unet(sample, 500, encoder_hidden_states=emb, cross_attention_kwargs={"scale": 0.5})


@pytest.mark.parametrize("argument", ["added_cond_kwargs", "timestep_cond", "class_labels",
                                      "mid_block_additional_residual"])
def test_unet_unsupported_arguments_are_rejected(exp, argument):
    sample, emb = torch.randn((1, 4, 8, 8), generator=gen(1)), torch.randn((1, 77, 32), generator=gen(2))
    value = {"text_embeds": torch.zeros(1, 32)} if argument == "added_cond_kwargs" else torch.zeros(1, 32)
    with pytest.raises(ShapeError, match=argument):
        exp.unet(sample, 500, encoder_hidden_states=emb, **{argument: value})


def test_sizes_the_graph_cannot_take_are_refused(exp, eager):
    """Eager UNets interpolate latents that are not a multiple of 2**upsamplers; traced graphs cannot."""
    assert images(eager, height=72, width=64).shape == (1, 72, 64, 3)  # eager copes
    with pytest.raises(ShapeError, match=r"latent_height 9 is not a multiple of 2; .* multiples of 16 \(e.g. 64 or 80\)"):
        images(exp, height=72, width=64)

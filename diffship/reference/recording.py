"""Recording what an eager pipeline feeds its components: the realistic inputs that parity replays
and that calibrated (activation-quantized) exports are calibrated on."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Iterator

import torch

from diffship.reference.specs import ComponentSpec

#: denoising steps of each calibration run by default. Fewer steps leave the final latents noisier (the VAE
#: decoder then sees another range): calibrate at the steps the pipeline will run where known
#: (``--calibration-steps``; bench and tune pass theirs).
CALIBRATION_STEPS = 10

#: prompts for calibration runs: varied subjects and styles, short and long.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn, soft light",
    "close-up portrait of an old fisherman, detailed skin, 85mm",
    "isometric pixel art of a tiny city with trees and cars",
)


@contextlib.contextmanager
def shadowing(pipe: Any, specs: list[ComponentSpec],
              wrap: Callable[[ComponentSpec, Callable], Callable]) -> Iterator[None]:
    """Each spec's method on the pipeline's module (eager, or an export's adapter) shadowed for the block by
    ``wrap(spec, original)`` on the instance, then restored; the modules' classes and weights are never touched."""
    patched = []
    for spec in specs:
        module = getattr(pipe, spec.source)
        original = getattr(module, spec.method)
        # the original's signature stays visible: an export's adapter binds its own method's arguments by it
        setattr(module, spec.method, functools.update_wrapper(wrap(spec, original), original))
        patched.append((module, spec.method))
    try:
        yield
    finally:
        for module, name in patched:
            delattr(module, name)


@contextlib.contextmanager
def record_calls(pipe: Any, specs: list[ComponentSpec], limit: int) -> Iterator[dict[str, list[dict]]]:
    """Record the spec-form inputs of every call the pipeline makes into its components (the first ``limit``
    of each), through :func:`shadowing`."""
    calls: dict[str, list[dict[str, torch.Tensor]]] = {s.name: [] for s in specs}

    def recording(spec: ComponentSpec, original: Callable) -> Callable:
        def recorder(*args, **kwargs):
            if len(calls[spec.name]) < limit:
                inputs = spec.inputs_for_call(original, args, kwargs)
                calls[spec.name].append({k: v.detach().clone() for k, v in inputs.items()})
            return original(*args, **kwargs)
        return recorder

    with shadowing(pipe, specs, recording):
        yield calls


def calibration_inputs(pipe: Any, specs: list[ComponentSpec], steps: int = CALIBRATION_STEPS,
                       prompts: tuple[str, ...] = CALIBRATION_PROMPTS,
                       progress: Callable[[str], None] | None = None,
                       size: tuple[int, int] | None = None) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Inputs each component receives while ``pipe`` generates ``prompts`` (seeded, ``steps`` steps) at
    ``size`` (height, width; default the pipeline's).

    ``progress`` hears before each prompt how far it is and, after the first, about how long is left
    (at full size this takes minutes). The runs stop at the latents unless a spec is not a denoiser (the
    VAE decoder: then each run decodes its image, one decoder call per prompt)."""
    height, width = size or (None, None)
    output = "latent" if all(s.denoiser for s in specs) else "np"
    start = time.perf_counter()
    with record_calls(pipe, specs, limit=10_000) as calls:
        for seed, prompt in enumerate(prompts):
            if progress:
                done = time.perf_counter() - start
                left = f", about {done / seed * (len(prompts) - seed):.0f} s left" if seed else ""
                progress(f"recording calibration inputs: prompt {seed + 1} of {len(prompts)}{left}")
            pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type=output,
                 height=height, width=width)
    return calls

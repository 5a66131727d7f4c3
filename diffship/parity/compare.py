"""Parity of an export against the eager pipeline it came from.

Two checks, both from one seeded run of each pipeline:

* **component parity** -- every call the eager pipeline makes into a component (text encoder, each
  UNet step, VAE encode/decode) is recorded with its real inputs; each recorded input is replayed
  through the eager wrapper module and through the exported component, and the outputs compared.
* **end-to-end parity** -- the same prompt, seed, scheduler and steps through the eager and the
  exported pipeline (text-to-image, then image-to-image from the eager image); images compared.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffship import backends
from diffship.backends.manifest import Manifest, read_manifest
from diffship.configs import between, load_tolerances
from diffship.errors import DiffshipError
from diffship.parity.result import ComponentResult, ImageResult, OutputResult, ParityReport
from diffship.progress import Progress, silent
from diffship.reference import load_with_info
from diffship.reference.families import family_of
from diffship.reference.pipelines import build_pipeline, set_scheduler, specs_for_pipeline
from diffship.reference.recording import record_calls
from diffship.reference.specs import ComponentSpec


@dataclass(frozen=True)
class ParitySettings:
    """What both pipelines are run with.

    Attributes:
        prompt / negative_prompt / seed / steps / guidance_scale: the generation request.
        height / width: image size (default: the export's static size, else the pipeline default).
        scheduler: a scheduler class name from ``pipe.scheduler.compatibles`` (default: the pipeline's).
        tasks: which of ``text2img``, ``img2img``, ``inpaint`` to run, as far as the export supports
            them (image-to-image and inpainting also exercise the VAE encoder). Their init image is
            the eager text-to-image result, or a fixed synthetic image for inpainting-only models.
        strength: image-to-image strength.
        max_calls: calls recorded per component (the UNet is called once per step, twice the batch).
    """

    prompt: str = "a photograph of an astronaut riding a horse"
    negative_prompt: str = "blurry, low quality"
    seed: int = 0
    steps: int = 10
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    tasks: tuple[str, ...] = ("text2img", "img2img", "inpaint")
    strength: float = 0.6
    max_calls: int = 64


def compare_component(spec: ComponentSpec, eager_module: torch.nn.Module, runner: Any,
                      recorded: list[dict[str, torch.Tensor]], tolerances: Any, reference: Any = None) -> ComponentResult:
    """Replay recorded inputs through the eager wrapper (or the ``reference`` runner) and the exported
    runner; compare every output.

    Metrics are over all replayed calls together (max over calls for ``max_abs``, means over all
    elements), so one bad UNet step fails the output.
    """
    start = time.perf_counter()
    eager = reference.infer if reference is not None else spec.eager(eager_module)
    expected: dict[str, list[np.ndarray]] = {n: [] for n in spec.output_names}
    actual: dict[str, list[np.ndarray]] = {n: [] for n in spec.output_names}
    for inputs in recorded:
        ref = eager(inputs)
        got = runner.infer(inputs)
        for name in spec.output_names:
            expected[name].append(ref[name].float().cpu().numpy())
            actual[name].append(got[name].float().cpu().numpy())  # CUDA runners return GPU tensors
    tolerance = tolerances.for_component(spec.name)
    outputs = [OutputResult.evaluate(name, *_stack(expected[name], actual[name]), tolerance)
               for name in spec.output_names]
    return ComponentResult(component=spec.name, calls=len(recorded), outputs=outputs,
                           seconds=time.perf_counter() - start)


def _stack(expected: list[np.ndarray], actual: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All calls as one array each; a call whose shapes differ is returned alone, so it fails visibly."""
    for e, a in zip(expected, actual):
        if e.shape != a.shape:
            return e, a
    return np.concatenate([e.ravel() for e in expected]), np.concatenate([a.ravel() for a in actual])


def synthetic_image(height: int, width: int) -> np.ndarray:
    """A deterministic smooth test image (HxWx3 in [0, 1]) for when no eager image exists yet."""
    y, x = np.mgrid[0:height, 0:width] / np.array([max(height - 1, 1), max(width - 1, 1)])[:, None, None]
    return np.stack([x, y, 0.5 + 0.5 * np.sin(6.0 * (x + y))], axis=-1).astype(np.float32)


def center_mask(height: int, width: int) -> np.ndarray:
    """Inpainting mask (HxW in {0, 1}): the central half of the image is repainted."""
    mask = np.zeros((height, width), dtype=np.float32)
    mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 1.0
    return mask


def generate_images(pipe: Any, settings: ParitySettings, task: str, init_image: np.ndarray, batch: int,
                    reference: bool = True) -> np.ndarray:
    """One request of ``task`` (its init image ``init_image``) through ``pipe``; ``reference``: a pipeline that
    takes a reference image for text-to-image (FLUX.1 Kontext) gets one (its tokens need a dynamic-shape export)."""
    from PIL import Image

    kwargs: dict[str, Any] = dict(
        prompt=settings.prompt, negative_prompt=settings.negative_prompt, num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale, generator=torch.Generator("cpu").manual_seed(settings.seed),
        num_images_per_prompt=batch, output_type="np", height=settings.height, width=settings.width,
    )
    image = Image.fromarray((init_image * 255).round().astype(np.uint8))
    # FLUX.1 Kontext's text-to-image takes a reference image (its only text2img class with an `image`), at the
    # size given: it would resize the reference to ~1 MP and the output to max_area otherwise
    kontext = dict(max_area=settings.height * settings.width, _auto_resize=False)
    if task == "text2img" and reference:
        kwargs.update(image=image, **kontext)
    elif task == "text2img":
        kwargs.update(kontext)
    elif task == "img2img":
        kwargs.update(image=image, strength=settings.strength)
        del kwargs["height"], kwargs["width"]
    elif task == "inpaint":
        mask = Image.fromarray((center_mask(settings.height, settings.width) * 255).astype(np.uint8))
        kwargs.update(image=image, mask_image=mask, **kontext)
    # what the class does not take goes (FluxFillPipeline has no negative prompt); the same for both sides
    taken = inspect.signature(pipe.__call__).parameters
    return np.asarray(pipe(**{k: v for k, v in kwargs.items() if k in taken}).images)


def check_parity(
    source: str | Path,
    exported: str | Path,
    *,
    reference: str | Path | None = None,
    settings: ParitySettings | None = None,
    tolerances_file: str | Path | None = None,
    config: str | Path | None = None,
    allow_pickle: bool = False,
    runtime_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> ParityReport:
    """Compare an export with the eager pipeline of ``source``, component by component and image by image.

    Args:
        source: the eager source (as for :func:`diffship.reference.load`); must be what was exported.
        exported: the exported folder.
        reference: another export of ``source`` to compare ``exported`` with instead of eager PyTorch
            (Polygraphy's runners side by side): the same recorded calls and requests through both, judged
            by :func:`~diffship.configs.between` of their two tolerance tables.
        settings: the generation request both pipelines run.
        tolerances_file: a TOML file replacing the bundled tolerances.
        config / allow_pickle: as for :func:`diffship.reference.load`.
        runtime_options: passed to the backend runners (e.g. ``device``, ``threads``).
        progress: called with a line of text before each step.

    Returns:
        The :class:`ParityReport`; ``report.passed`` says whether every check met its tolerance.
    """
    from diffship.runtimes.pipeline import open_export

    say = progress or silent
    started = time.perf_counter()
    folders = [Path(exported)] + ([Path(reference)] if reference is not None else [])
    manifests = [read_manifest(f) for f in folders]
    for m in manifests:
        load_tolerances(m.backend, m.precision, tolerances_file)  # a missing table is refused before any work
    say(f"loading {source}")
    eager, info = load_with_info(source, config=config, allow_pickle=allow_pickle)
    for folder, m in zip(folders, manifests):
        check_source(folder, m, source, info)
    with contextlib.ExitStack() as stack:
        opened = []
        for folder in folders:
            say(f"loading {folder}")
            # Non-finite outputs are parity failures (reported with their figures), not errors that end the run.
            opened.append(stack.enter_context(open_export(folder, verify=False, check_finite=False, source=eager,
                                                          **(runtime_options or {}))))
        tolerances = [judged_by(o, tolerances_file) for o in opened]
        tolerance = tolerances[0] if reference is None else between(tolerances[1], tolerances[0])
        loaded, manifest, precision = opened[0], opened[0].manifest, tolerances[0].precision
        against = opened[1] if reference is not None else None
        settings = _resolve_size(settings or ParitySettings(), manifest)
        batch = manifest.shapes.profile.batch_size if manifest.shapes.static else 1
        for pipe in (eager, *(o.pipeline for o in opened)):
            set_scheduler(pipe, settings.scheduler)
            pipe.set_progress_bar_config(disable=True)
        family = family_of(manifest.pipeline_class)
        specs = [s for s in specs_for_pipeline(eager) if all(s.name in o.manifest.components for o in opened)]
        tasks = [t for t in settings.tasks if all(t in o.manifest.tasks for o in opened)]
        # fixed-shape exports take no reference-image tokens beside the image's (Kontext)
        reference_image = not any(o.manifest.shapes.static or backends.get(o.manifest.backend).fixed_shapes
                                  for o in opened)

        images: list[ImageResult] = []
        init_image = synthetic_image(settings.height, settings.width)
        with record_calls(eager, specs, settings.max_calls) as calls:
            for task in tasks:
                say(f"running {task}, {'eager and ' if against is None else 'eager, reference and '}exported "
                    f"({settings.steps} steps)")
                cls = family.pipeline_class(task)
                # The pipeline settings (the refiner's requires_aesthetics_score) are in the config, not in components.
                pair = [build_pipeline(cls, {**dict(p.config), **p.components})
                        for p in (eager, *(o.pipeline for o in reversed(opened)))]
                for p in pair:
                    p.set_progress_bar_config(disable=True)
                want = generate_images(pair[0], settings, task, init_image, batch, reference_image)  # records the calls
                if against is not None:
                    want = generate_images(pair[1], settings, task, init_image, batch, reference_image)
                got = generate_images(pair[-1], settings, task, init_image, batch, reference_image)
                images += [ImageResult.evaluate(task, i, e, g, tolerance.image) for i, (e, g) in enumerate(zip(want, got))]
                if task == "text2img":
                    init_image = want[0]
        components = []
        for spec in specs:
            say(f"comparing {spec.name} on {len(calls[spec.name])} recorded calls")
            if calls[spec.name]:
                components.append(compare_component(
                    spec, getattr(eager, spec.source), loaded.runners[spec.name], calls[spec.name], tolerance,
                    reference=against.runners[spec.name] if against is not None else None))
        evaluator = _evaluator(loaded.runners[specs[0].name].describe(), manifest)
        if against is not None:
            evaluator += f"; reference {reference}: " + _evaluator(against.runners[specs[0].name].describe(),
                                                                   against.manifest)
        return ParityReport(
            source=str(source), export=str(exported), backend=manifest.backend, precision=precision,
            evaluator=evaluator, settings={**asdict(settings), "tasks": tasks,
                                           "scheduler": type(eager.scheduler).__name__},
            components=components, images=images, seconds=time.perf_counter() - started, versions=manifest.versions,
            reference=str(reference) if reference is not None else None, runtime=loaded.settings,
        )


def check_source(folder: Path, manifest: Manifest, source: str | Path, info: Any) -> None:
    """Refuse to compare an export with a source it was not made from (their fingerprints differ)."""
    if manifest.source.fingerprint and info.fingerprint != manifest.source.fingerprint:
        raise DiffshipError(
            f"{folder} was exported from {manifest.source.name!r} (fingerprint {manifest.source.fingerprint[:12]}), "
            f"not from {source!r} ({info.fingerprint[:12]}); compare an export with its own source")


def judged_by(loaded: Any, tolerances_file: str | Path | None = None):
    """The tolerances of an opened export: of the precision its runners compute in (OpenVINO computing
    in bf16 is judged by bf16 tolerances), else of its manifest's; reduced weights computed in another
    reduced precision (hybrid int8 in bf16) by both errors added (:func:`~diffship.configs.between`)."""
    return tolerances_for(loaded.manifest, loaded.runners.values(), tolerances_file)


def tolerances_for(manifest: Manifest, runners: Any, tolerances_file: str | Path | None = None):
    """:func:`judged_by` for an export's ``manifest`` and the ``runners`` opened of it."""
    compute = {r.compute_precision for r in runners} - {None}
    precision = compute.pop() if len(compute) == 1 else manifest.precision
    tolerances = load_tolerances(manifest.backend, precision, tolerances_file)
    if precision == manifest.precision or manifest.precision == "fp32":
        return tolerances
    return between(load_tolerances(manifest.backend, manifest.precision, tolerances_file), tolerances)


def _evaluator(runner: str, manifest: Manifest) -> str:
    """What ran the export; for another tool's export also its origin, and what could not be verified
    (without ``diffship adopt`` no manifest recorded its files; without ``--source`` not its source)."""
    if manifest.origin == "diffship":
        return runner
    if not manifest.files:
        return f"{runner}; {manifest.origin} export, no diffship manifest: files and source not verified"
    source = "" if manifest.source.fingerprint else ", source not verified"
    return f"{runner}; {manifest.origin} export adopted by diffship{source}"


def _resolve_size(settings: ParitySettings, manifest: Manifest) -> ParitySettings:
    from dataclasses import replace

    profile = manifest.shapes.profile
    return replace(settings, height=settings.height or profile.height, width=settings.width or profile.width)

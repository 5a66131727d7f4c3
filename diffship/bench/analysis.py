"""What a run derives from raw replies: parity figures against the reference subject, and per scheduler
the UNet calls per step and the steps it needs."""

from __future__ import annotations

from typing import Any

from diffship.bench.records import (BenchResults, ImageParity, PipelineMeasurement, SchedulerSummary, TensorParity,
                                    finite_or_text, psnr_value)

#: PSNR (dB) at which an image counts as converged to the same scheduler's most-steps image.
CONVERGED_PSNR = 30.0


def tensor_parity(expected: dict[str, Any], actual: dict[str, Any]) -> TensorParity:
    """Worst output of a component (lowest PSNR) against the reference's on the same inputs."""
    from diffship.parity.metrics import tensor_metrics

    worst = min((tensor_metrics(expected[k], actual[k]) for k in expected), key=lambda m: m.psnr)
    return TensorParity(psnr_db=finite_or_text(worst.psnr), max_abs=worst.max_abs, cosine=worst.cosine)


def image_parity(expected: Any, actual: Any) -> ImageParity:
    from diffship.parity.metrics import image_metrics

    m = image_metrics(expected, actual)
    return ImageParity(psnr_db=finite_or_text(m.psnr), ssim=m.ssim, max_abs=m.max_abs)


def point_key(point: PipelineMeasurement | dict[str, Any]) -> tuple:
    """An end-to-end setting: batch, height, width, steps, scheduler."""
    fields = ("batch", "height", "width", "steps", "scheduler")
    if isinstance(point, dict):
        return tuple(point[k] for k in fields)
    return tuple(getattr(point, k) for k in fields)


def scheduler_summary(doc: BenchResults, images: dict[tuple, Any]) -> list[SchedulerSummary]:
    """Per scheduler: UNet calls per step, and the fewest measured steps whose image is within
    :data:`CONVERGED_PSNR` of the image at the most measured steps (reference subject)."""
    from diffship.parity.metrics import image_metrics

    st, reference = doc.settings, doc.reference
    out = []
    for scheduler in st["schedulers"]:
        rows = [m for m in doc.find(kind="pipeline", subject=reference, scheduler=scheduler, batch=st["batches"][0])
                if m.latency_ms and f"{m.height}x{m.width}" == st["sizes"][0]]
        if not rows:
            continue
        rows.sort(key=lambda m: m.steps)
        final = images.get((reference, *point_key(rows[-1])))
        psnr = {}
        for m in rows:
            image = images.get((reference, *point_key(m)))
            if image is not None and final is not None:
                psnr[str(m.steps)] = finite_or_text(image_metrics(final, image).psnr)
        needed = next((int(k) for k, v in psnr.items() if psnr_value(v) >= CONVERGED_PSNR), None)
        out.append(SchedulerSummary(scheduler=scheduler, scheduler_class=rows[0].scheduler_class, subject=reference,
                                    unet_calls_per_step=round(rows[0].unet_calls / rows[0].steps, 2),
                                    steps_needed=needed, psnr_by_steps=psnr))
    return out

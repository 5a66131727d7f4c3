"""``diffship generate EXPORTED --prompt ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from diffship._files import atomic_write, png_bytes
from diffship.cli import app
from diffship.cli._common import console, out, parse_size, runtime_options, steps
from diffship.errors import DiffshipError


@app.command()
def generate(
    exported: Path = typer.Argument(..., help="Folder written by diffship export."),
    prompt: str = typer.Option(..., "--prompt", help="Text prompt."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    steps_: int = typer.Option(25, "--steps", min=1, help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale (<= 1 turns it off)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the torch generator."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Scheduler class, e.g. EulerDiscreteScheduler."),
    size: Optional[str] = typer.Option(None, "--size", metavar="HxW", help="Image size (default: the model's)."),
    num_images: int = typer.Option(1, "--num-images", min=1, help="Images for the prompt."),
    output: Path = typer.Option(Path("generated"), "--out", help="Folder for the PNG files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace images of the same name in --out."),
    device: Optional[str] = typer.Option(None, "--device", help="Where to run (onnx: cpu, cuda, tensorrt; comma list = fallbacks)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Runtime threads."),
    option: Optional[list[str]] = typer.Option(None, "--option", "-o", metavar="KEY=VALUE",
                                               help="Backend-specific runtime option (repeatable; JSON values)."),
    source: Optional[str] = typer.Option(None, "--source", help="What the export was converted from, for folders "
                                         "without configs, scheduler or tokenizer (Apple's torch2coreml output)."),
) -> None:
    """Generate images with an exported pipeline, exactly as diffusers would."""
    import torch

    from diffship._files import check_writable
    from diffship.reference.pipelines import set_scheduler
    from diffship.runtimes.pipeline import open_export

    hw = parse_size(size)
    targets = [output / f"seed{seed}-{i}.png" for i in range(num_images)]
    check_writable(output)  # refused now, not after the denoising
    if not overwrite and (taken := next((p for p in targets if p.exists()), None)):
        raise DiffshipError(f"{taken} already exists; pass --overwrite, or choose another --out or --seed")
    with steps("loading") as say:
        say(f"loading {exported}")
        loaded = open_export(exported, task="text2img", source=source, **runtime_options(device, threads, option))
        pipe, shapes = loaded.pipeline, loaded.manifest.shapes
        if hw is None and shapes.static:  # a static export takes only its own size
            hw = shapes.profile.height, shapes.profile.width
        pipe.set_progress_bar_config(disable=True)
        set_scheduler(pipe, scheduler)
    for text in filter(None, (prompt, negative_prompt)):
        _note_truncation(pipe, text)
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)
    with loaded, bars as bar:
        task = bar.add_task(f"denoising ({type(pipe.scheduler).__name__})", total=steps_)

        def advance(pipeline, step, _timestep, tensors):
            # Schedulers may run more or fewer timesteps than asked (PNDM, img2img strength).
            bar.update(task, total=pipeline.num_timesteps, completed=step + 1)
            return tensors

        images = pipe(
            prompt, negative_prompt=negative_prompt, num_inference_steps=steps_, guidance_scale=guidance,
            height=hw[0] if hw else None, width=hw[1] if hw else None, num_images_per_prompt=num_images,
            generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=advance,
        ).images
    for path, image in zip(targets, images):
        try:
            atomic_write(path, png_bytes(image), replace=overwrite)
        except FileExistsError:  # written by another process since the check above
            raise DiffshipError(f"{path} was written by another process meanwhile; pass --overwrite, or choose "
                                f"another --out or --seed") from None
        out.print(f"wrote {path}")
    out.print(f"ran {loaded.manifest.backend} {loaded.manifest.precision} with {loaded.describe_settings()}")


def _note_truncation(pipe, text: str) -> None:
    """Say when a prompt is longer than the text encoder takes: diffusers cuts it (its own warning is
    among the library logs the CLI keeps quiet)."""
    tokenizer = pipe.tokenizer or pipe.tokenizer_2
    count = len(tokenizer(text).input_ids)
    if count > tokenizer.model_max_length:
        console.print(f"[yellow]note[/]: a prompt is {count} tokens; the text encoder takes {tokenizer.model_max_length}, "
                      f"so the rest is cut (as diffusers does)", soft_wrap=True)

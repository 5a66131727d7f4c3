"""Parity of one exported component on one call, for models too large to load: ``diffship parity
SOURCE EXPORTED --component NAME``.

The whole-pipeline check (:func:`~diffship.parity.compare.check_parity`) records calls from an eager run of
the loaded pipeline. A source larger than memory (FLUX.1-dev: 66 GB in float32) cannot be loaded, so
here the component's eager reference runs on seeded example inputs with its weights read layer by layer
from the source's files (:func:`~diffship.reference.layerwise.weights_on_call`), and the exported
component gets the same inputs. No images: the pipeline's other parts never run.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffship.backends.manifest import read_manifest
from diffship.errors import DiffshipError
from diffship.parity.compare import check_source, compare_component, tolerances_for
from diffship.parity.result import ParityReport
from diffship.progress import Progress, silent


def check_one_call(source: str | Path, exported: str | Path, component: str, *, height: int | None = None,
                   width: int | None = None, seed: int = 0, tolerances_file: str | Path | None = None,
                   runtime_options: dict[str, Any] | None = None, progress: Progress | None = None) -> ParityReport:
    """Compare one call of ``component`` of the export ``exported`` with eager PyTorch on the same seeded
    inputs (the export's profile, at ``height`` x ``width`` where given), the eager side reading its weights
    layer by layer from ``source``'s files (as loaded where ``source`` cannot stream: a single file).

    Raises:
        DiffshipError: ``component`` is not in the export, or the export was not made from ``source``.
    """
    from diffship import backends
    from diffship.configs import load_tolerances
    from diffship.reference import load_with_info
    from diffship.reference.layerwise import weights_on_call
    from diffship.reference.loader import resolve_source, stored_weights
    from diffship.reference.pipelines import specs_for_pipeline
    from diffship.runtimes import open_runner

    say = progress or silent
    started = time.perf_counter()
    exported = Path(exported)
    manifest = read_manifest(exported)
    if component not in manifest.components:
        raise DiffshipError(f"{exported} has no component {component!r}; it has: {', '.join(manifest.components)}")
    load_tolerances(manifest.backend, manifest.precision, tolerances_file)  # a missing table: refused now
    streamed = resolve_source(source)[1] != "single_file"
    say(f"loading {source}" + (" (weights read layer by layer as they are called)" if streamed else ""))
    pipe, info = load_with_info(source, stream=streamed)
    check_source(exported, manifest, source, info)
    spec = next(s for s in specs_for_pipeline(pipe) if s.name == component)
    profile = manifest.shapes.profile
    profile = replace(profile, height=height or profile.height, width=width or profile.width)
    inputs = spec.example_inputs(profile, "fp32", seed)
    module, stored = getattr(pipe, spec.source), stored_weights(pipe, info).get(spec.source)
    options = manifest.runtime_options(runtime_options)
    say(f"running {component} once at {profile.height}x{profile.width}, exported and eager")
    with open_runner(manifest.backend, exported / component, manifest.components[component], **options) as runner, \
            (weights_on_call(module, stored) if stored is not None else contextlib.nullcontext()):
        tolerance = tolerances_for(manifest, [runner], tolerances_file)
        result = compare_component(spec, module, runner, [inputs], tolerance)
        evaluator = runner.describe()
    return ParityReport(
        source=str(source), export=str(exported), backend=manifest.backend, precision=tolerance.precision,
        evaluator=f"{evaluator}; eager weights read layer by layer" if stored is not None else evaluator,
        settings={"component": component, "seed": seed, "height": profile.height, "width": profile.width,
                  "batch_size": profile.batch_size},
        components=[result], seconds=time.perf_counter() - started, versions=manifest.versions,
        runtime=backends.get(manifest.backend).runtime_settings(options))

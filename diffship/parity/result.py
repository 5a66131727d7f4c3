"""The parity report data model, and its stable JSON schema ``diffship.parity/1``.

:meth:`ParityReport.to_dict` gives the JSON document below; :meth:`ParityReport.from_dict` reads it back.
Within schema ``diffship.parity/1`` fields are only ever added, never renamed or removed; readers must
ignore fields they do not know.

Floats: JSON has no infinity or NaN, so every non-finite float is written as the string ``"inf"``,
``"-inf"`` or ``"nan"`` (e.g. ``"psnr": "inf"`` for identical outputs); finite floats stay numbers.

Top level:

* ``schema`` (str): ``"diffship.parity/1"``.
* ``passed`` (bool): every comparison is within tolerance and at least one comparison was made.
* ``source`` (str): the model source that was exported (folder, hub id or preset).
* ``export`` (str): the exported folder that was checked.
* ``reference`` (str, optional): another export it was compared with instead of eager PyTorch
  (``diffship parity SOURCE A B``); the tolerances are then both exports' combined.
* ``backend`` (str): ``"onnx"``, ...; ``precision`` (str): ``"fp32"`` or ``"fp16"``.
* ``evaluator`` (str): what ran the exported models, e.g. ``"onnxruntime CPUExecutionProvider"``; for an
  export another tool wrote (optimum), also its origin and that its files were not verified.
* ``runtime`` (object, optional): the runtime options the export ran with (its manifest's settings, then
  the caller's), defaults filled in, e.g. ``{"device": "CPU", "inference_precision": "f32"}``.
* ``started`` (str): ISO 8601 start time; ``seconds`` (float): wall time of the whole check.
* ``settings`` (object): the generation settings (prompt, negative_prompt, seed, steps, guidance_scale,
  height, width, scheduler, ...); free-form, values as given.
* ``versions`` (object of str): package name -> version (torch, diffusers, onnxruntime, diffship, ...).
* ``components`` (array): one object per exported component:

  * ``component`` (str): ``"unet"``, ``"vae_decoder"``, ...
  * ``calls`` (int): how many recorded eager calls were replayed on the export.
  * ``seconds`` (float): time spent replaying and comparing.
  * ``passed`` (bool): every output passed (and there was at least one).
  * ``outputs`` (array): per output, ``name`` (str), ``passed`` (bool), ``failures`` (array of str),
    ``metrics`` (object: the fields of :class:`~diffship.parity.metrics.TensorMetrics` -- ``max_abs``,
    ``mean_abs``, ``p99_abs``, ``max_rel``, ``mean_rel``, ``p99_rel``, ``cosine``, ``psnr`` floats,
    ``nonfinite_expected``, ``nonfinite_actual`` ints, ``shape_expected``, ``shape_actual`` int arrays) and
    ``tolerance`` (object: the fields of :class:`~diffship.parity.metrics.TensorTolerance` -- ``max_abs``,
    ``mean_abs``, ``p99_abs``, ``cosine_min``, ``psnr_min``, each a float or ``null`` for "not checked").

* ``images`` (array): one object per compared final image:

  * ``task`` (str): ``"text2img"``, ``"img2img"``, ...; ``index`` (int): image index within the task.
  * ``passed`` (bool); ``failures`` (array of str).
  * ``metrics`` (object): the fields of :class:`~diffship.parity.metrics.ImageMetrics` -- ``psnr``,
    ``ssim``, ``max_abs``, ``mean_abs`` floats, ``nonfinite_expected``, ``nonfinite_actual`` ints,
    ``shape_expected``, ``shape_actual`` int arrays.
  * ``tolerance`` (object): :class:`~diffship.parity.metrics.ImageTolerance` -- ``psnr_min``,
    ``ssim_min``, ``max_abs``, floats or ``null``.
  * ``files`` (object, optional): PNG paths relative to the report's folder -- ``eager``, ``exported``
    and (when the shapes match) ``diff``, the difference heat map. Present only when the images were
    written (by :func:`diffship.parity.report.write_html`).

* ``failures`` (array of str): every failure, prefixed with what failed (``"unet/out_sample: ..."``,
  ``"text2img[0]: ..."``); derived, ignored when reading.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from diffship.errors import DiffshipError
from diffship.parity.metrics import (
    ImageMetrics,
    ImageTolerance,
    TensorMetrics,
    TensorTolerance,
    check_image,
    check_tensor,
    image_metrics,
    tensor_metrics,
)

SCHEMA = "diffship.parity/1"


@dataclass
class OutputResult:
    """One output of one component, compared over its replayed calls.

    Attributes:
        name: the output's IO name, e.g. ``"out_sample"``.
        metrics: the comparison.
        tolerance: the limits it was judged against.
        failures: what is outside the limits (empty when it passed).
    """

    name: str
    metrics: TensorMetrics
    tolerance: TensorTolerance
    failures: list[str] = field(default_factory=list)

    @classmethod
    def evaluate(cls, name: str, expected: Any, actual: Any, tolerance: TensorTolerance) -> OutputResult:
        """Compare ``actual`` (export) with ``expected`` (eager) and judge the result."""
        metrics = tensor_metrics(expected, actual)
        return cls(name, metrics, tolerance, check_tensor(metrics, tolerance))

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ComponentResult:
    """All outputs of one exported component.

    Attributes:
        component: component name, e.g. ``"unet"``.
        calls: how many recorded eager calls were replayed on the export.
        outputs: one result per output.
        seconds: time spent replaying and comparing.
    """

    component: str
    calls: int
    outputs: list[OutputResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """Every output passed, and there was at least one."""
        return bool(self.outputs) and all(o.passed for o in self.outputs)


@dataclass
class ImageResult:
    """One final image of a whole-pipeline run, eager vs. export.

    Attributes:
        task: ``"text2img"``, ``"img2img"``, ...
        index: image index within the task.
        metrics: the comparison.
        tolerance: the limits it was judged against.
        failures: what is outside the limits (empty when it passed).
        eager_image: H x W x C floats in [0, 1]; kept for the HTML report, never serialized.
        exported_image: same, from the export.
        files: PNG paths relative to the report folder (``eager``, ``exported``, ``diff``), recorded by
            :func:`diffship.parity.report.write_html`; empty when not written.
    """

    task: str
    index: int
    metrics: ImageMetrics
    tolerance: ImageTolerance
    failures: list[str] = field(default_factory=list)
    eager_image: np.ndarray | None = field(default=None, repr=False, compare=False)
    exported_image: np.ndarray | None = field(default=None, repr=False, compare=False)
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def evaluate(cls, task: str, index: int, eager: Any, exported: Any, tolerance: ImageTolerance) -> ImageResult:
        """Compare two images, judge the result, and keep both images for the HTML report."""
        metrics = image_metrics(eager, exported)
        return cls(task, index, metrics, tolerance, check_image(metrics, tolerance), eager, exported)

    @property
    def label(self) -> str:
        """``"text2img[0]"``: how reports and failure messages name this image."""
        return f"{self.task}[{self.index}]"

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class Check:
    """One named verdict of a report, flattened for failure lists, JUnit test cases and summaries.

    Attributes:
        kind: ``"component"`` (one output), ``"image"``, or ``"report"`` (a structural problem).
        name: ``"unet/out_sample"``, ``"text2img[0]"``, ``"unet"`` (no outputs) or ``"parity"``.
        failures: the failures (empty when it passed).
        seconds: time attributed to it (a component's time is split over its outputs).
    """

    kind: str
    name: str
    failures: tuple[str, ...]
    seconds: float = 0.0


@dataclass
class ParityReport:
    """Everything ``diffship parity`` found; see the module docstring for the JSON form.

    Attributes:
        source: the model source that was exported.
        export: the exported folder that was checked.
        backend: ``"onnx"``, ...
        precision: ``"fp32"`` or ``"fp16"``.
        evaluator: what ran the exported models.
        settings: generation settings (prompt, negative_prompt, seed, steps, guidance_scale, height, width,
            scheduler, ...).
        components: per-component results.
        images: per-image results.
        started: ISO 8601 start time.
        seconds: wall time of the whole check.
        versions: package name -> version.
        reference: the other export ``export`` was compared with instead of eager PyTorch, or None.
        runtime: the runtime options the export ran with.
    """

    source: str
    export: str
    backend: str
    precision: str
    evaluator: str
    settings: dict[str, Any] = field(default_factory=dict)
    components: list[ComponentResult] = field(default_factory=list)
    images: list[ImageResult] = field(default_factory=list)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    reference: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)

    def checks(self) -> Iterator[Check]:
        """Every verdict in report order: component outputs, then images, then structural problems."""
        for c in self.components:
            if not c.outputs:
                yield Check("component", c.component, ("no outputs were compared",), c.seconds)
            for o in c.outputs:
                yield Check("component", f"{c.component}/{o.name}", tuple(o.failures), c.seconds / len(c.outputs))
        for image in self.images:
            yield Check("image", image.label, tuple(image.failures))
        if not self.components and not self.images:
            yield Check("report", "parity", ("no components or images were compared",))

    def failures(self) -> list[str]:
        """Every failure, prefixed with what failed: ``"unet/out_sample: max_abs 2.1e-03 > 1.0e-04"``."""
        return [f"{c.name}: {f}" for c in self.checks() for f in c.failures]

    @property
    def passed(self) -> bool:
        """All comparisons passed and at least one was made."""
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe ``diffship.parity/1`` document (see the module docstring)."""
        return {
            "schema": SCHEMA,
            "passed": self.passed,
            "source": self.source,
            "export": self.export,
            **({"reference": self.reference} if self.reference else {}),
            "backend": self.backend,
            "precision": self.precision,
            "evaluator": self.evaluator,
            "runtime": json_safe(self.runtime),
            "started": self.started,
            "seconds": json_safe(self.seconds),
            "settings": json_safe(self.settings),
            "versions": json_safe(self.versions),
            "components": [
                {
                    "component": c.component,
                    "calls": c.calls,
                    "seconds": json_safe(c.seconds),
                    "passed": c.passed,
                    "outputs": [
                        {
                            "name": o.name,
                            "passed": o.passed,
                            "metrics": json_safe(o.metrics),
                            "tolerance": json_safe(o.tolerance),
                            "failures": list(o.failures),
                        }
                        for o in c.outputs
                    ],
                }
                for c in self.components
            ],
            "images": [
                {
                    "task": i.task,
                    "index": i.index,
                    "passed": i.passed,
                    "metrics": json_safe(i.metrics),
                    "tolerance": json_safe(i.tolerance),
                    "failures": list(i.failures),
                    **({"files": dict(i.files)} if i.files else {}),
                }
                for i in self.images
            ],
            "failures": self.failures(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityReport:
        """Read a ``diffship.parity/1`` document back; derived fields (``passed``, ``failures``) are ignored.

        Raises:
            DiffshipError: another schema, or a missing or malformed field.
        """
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise DiffshipError(f"not a {SCHEMA} parity report (schema: {found!r})")
        try:
            return cls(
                source=data["source"],
                export=data["export"],
                reference=data.get("reference"),
                backend=data["backend"],
                precision=data["precision"],
                evaluator=data["evaluator"],
                runtime=dict(data.get("runtime", {})),
                started=data["started"],
                seconds=float(data["seconds"]),
                settings=dict(data.get("settings", {})),
                versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
                components=[
                    ComponentResult(
                        component=c["component"],
                        calls=int(c["calls"]),
                        seconds=float(c["seconds"]),
                        outputs=[
                            OutputResult(
                                name=o["name"],
                                metrics=_load(TensorMetrics, o["metrics"]),
                                tolerance=_load(TensorTolerance, o["tolerance"]),
                                failures=[str(f) for f in o["failures"]],
                            )
                            for o in c["outputs"]
                        ],
                    )
                    for c in data["components"]
                ],
                images=[
                    ImageResult(
                        task=i["task"],
                        index=int(i["index"]),
                        metrics=_load(ImageMetrics, i["metrics"]),
                        tolerance=_load(ImageTolerance, i["tolerance"]),
                        failures=[str(f) for f in i["failures"]],
                        files={str(k): str(v) for k, v in i.get("files", {}).items()},
                    )
                    for i in data["images"]
                ],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DiffshipError(f"malformed {SCHEMA} parity report: {type(e).__name__}: {e}") from None


def json_safe(value: Any) -> Any:
    """Convert ``value`` to JSON-safe data: non-finite floats become ``"inf"``/``"-inf"``/``"nan"``.

    Dataclasses become objects, tuples and arrays become lists, numpy scalars become numbers, paths
    become strings.
    """
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, (int, np.integer)):
        return int(value)
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        return json_safe(asdict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _load(cls: type, data: dict[str, Any]) -> Any:
    """Build a metrics or tolerance dataclass from its JSON object (undoing :func:`json_safe`).

    These dataclasses hold only floats (``float("inf")`` reads the string forms back), optional floats,
    ints and int tuples, so the annotation text is enough to pick the conversion.
    """
    kwargs = {}
    for f in fields(cls):
        value = data.get(f.name)
        if value is None:
            if "None" not in str(f.type):
                raise KeyError(f"{cls.__name__}.{f.name}")
        elif str(f.type).startswith("tuple"):
            value = tuple(int(v) for v in value)
        elif str(f.type) == "int":
            value = int(value)
        else:
            value = float(value)
        kwargs[f.name] = value
    return cls(**kwargs)

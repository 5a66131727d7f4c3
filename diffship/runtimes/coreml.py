"""Core ML runtime: ``MLModel.predict`` on macOS, the MIL reference evaluator everywhere else.

On macOS the Core ML framework runs each ``.mlpackage`` on the compute units asked for (``all``,
``cpuOnly``, ``cpuAndGPU``, ``cpuAndNeuralEngine``). ``MLModel.predict`` does not exist elsewhere, so
on Linux the runner executes the saved ML Program with the MIL reference evaluator
(:mod:`diffship.runtimes._mil`): pipelines, ``diffship generate`` and ``diffship parity`` work the
same, and reports name which evaluator produced the numbers.

The runner takes the same tensors as every backend's and converts them to the model's own inputs
(Apple's Swift-pipeline layouts, see :mod:`diffship.exporters.coreml`).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from diffship._registry import require_modules
from diffship.errors import DiffshipError, ExportedModelError, RuntimeFailure, ShapeError, UnavailableRuntimeError
from diffship.runtimes.base import Runner, check_options

BACKENDS = ("coreml",)
EXTRA = "coreml"
PACKAGES = ("coremltools",)
MODEL_FILE = "model.mlpackage"
#: ``compute_units`` names (as Apple's Swift CLI spells them) -> coremltools ComputeUnit members.
COMPUTE_UNITS = {"all": "ALL", "cpuOnly": "CPU_ONLY", "cpuAndGPU": "CPU_AND_GPU", "cpuAndNeuralEngine": "CPU_AND_NE"}
EVALUATORS = ("auto", "coreml", "mil")


def has_coreml_runtime() -> bool:
    """Whether Core ML itself can run models here (macOS only)."""
    return platform.system() == "Darwin"


class CoreMLRunner(Runner):
    """One Core ML model per component.

    Args:
        folder: the component folder holding ``model.mlpackage``.
        component: the component's manifest entry.
        compute_units: ``all`` (default), ``cpuOnly``, ``cpuAndGPU`` or ``cpuAndNeuralEngine`` (Core ML runtime).
        evaluator: ``auto`` (Core ML on macOS, the MIL reference elsewhere), ``coreml`` or ``mil``.
    """

    def __init__(self, folder: Path, component: dict[str, Any], compute_units: str = "all",
                 evaluator: str = "auto"):
        super().__init__(component["component"], component["inputs"], component["outputs"])
        if compute_units not in COMPUTE_UNITS:
            raise DiffshipError(f"unknown compute_units {compute_units!r}; choose one of: {', '.join(COMPUTE_UNITS)}")
        if evaluator not in EVALUATORS:
            raise DiffshipError(f"unknown evaluator {evaluator!r}; choose one of: {', '.join(EVALUATORS)}")
        self.details = component["details"]
        self.path = Path(folder) / MODEL_FILE
        if not self.path.is_dir():
            raise ExportedModelError(f"{self.path} is missing; re-run diffship export")
        self.compute_units = compute_units
        self.evaluator = ("coreml" if has_coreml_runtime() else "mil") if evaluator == "auto" else evaluator
        sizes = self.details["sizes"]
        self.shape_note = f" -- Core ML exports take fixed sizes: {', '.join(f'{h}x{w}' for h, w in sizes)} px"
        self.shape_advice = "re-export with this size (--static HxW, or -o sizes=... for several)"
        if self.evaluator == "coreml":
            if not has_coreml_runtime():
                raise UnavailableRuntimeError(f"the Core ML runtime (MLModel.predict) exists only on macOS, not on "
                                              f"{platform.system()}; use evaluator=mil (the MIL reference evaluator)")
            import coremltools as ct

            try:
                self._model = ct.models.MLModel(str(self.path),
                                                compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))
            except Exception as exc:
                raise RuntimeFailure(f"Core ML could not load {self.path} ({exc})") from exc
        else:
            from diffship.runtimes._mil import MilReference

            self._model = MilReference(self.path)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        from diffship.exporters.coreml import to_model_inputs

        model_feeds = to_model_inputs(self.name, feeds)
        self._check_size(model_feeds)
        if self.evaluator == "coreml":
            return self._model.predict(model_feeds)
        return self._model.run(model_feeds)

    def _check_size(self, model_feeds: dict[str, np.ndarray]) -> None:
        """Enumerated-shape models take exactly their listed shapes."""
        for spec in self.details["model_inputs"]:
            shapes = [tuple(s) for s in spec["shapes"]]
            got = tuple(model_feeds[spec["name"]].shape)
            if got not in shapes:
                raise ShapeError(f"{self.name}: input {spec['name']} has shape {got}, but this Core ML export takes "
                                 f"{' or '.join(map(str, shapes))}{self.shape_note}; {self.shape_advice}")

    def describe(self) -> str:
        if self.evaluator == "coreml":
            return f"Core ML runtime (macOS, compute units {self.compute_units})"
        return f"MIL reference ({platform.system()})"


def open_runner(folder: Path, component: dict[str, Any], options: dict[str, Any]) -> CoreMLRunner:
    require_modules(BACKENDS[0], EXTRA, *PACKAGES)
    check_options(CoreMLRunner, options)
    return CoreMLRunner(folder, component, **options)

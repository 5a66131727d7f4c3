"""Core ML runtime: ``MLModel.predict`` on macOS, the MIL reference evaluator everywhere else.

On macOS the Core ML framework runs each ``.mlpackage`` on the compute units asked for (``all``,
``cpuOnly``, ``cpuAndGPU``, ``cpuAndNeuralEngine``). ``MLModel.predict`` does not exist elsewhere, so
on Linux the runner executes the saved ML Program with the MIL reference evaluator
(:mod:`diffship.runtimes.mil`): pipelines, ``diffship generate`` and ``diffship parity`` work the
same, and reports name which evaluator produced the numbers.

The runner takes the same tensors as every backend's and converts them to the model's own inputs
(Apple's Swift-pipeline layouts, see :mod:`diffship.backends.coreml`).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from diffship.backends.coreml import (COMPUTE_UNITS, MODEL_FILE, CoreMLRuntimeOptions, has_coreml_runtime,
                                      to_model_inputs)
from diffship.backends.manifest import ComponentEntry, inside
from diffship.errors import ExportedModelError, RuntimeFailure, ShapeError, UnavailableRuntimeError
from diffship.runtimes.base import Runner


class CoreMLRunner(Runner):
    """One Core ML model per component (options: :class:`CoreMLRuntimeOptions`)."""

    def __init__(self, folder: Path, entry: ComponentEntry, options: CoreMLRuntimeOptions):
        super().__init__(folder, entry, options)
        compute_units, evaluator = options.compute_units, options.evaluator
        package = self.details.package
        if package and not inside(package):
            raise ExportedModelError(f"{folder}: the package path {package!r} leaves the export folder; refusing it")
        self.path = Path(folder).parent / package if package else Path(folder) / MODEL_FILE
        if not self.path.is_dir():
            raise ExportedModelError(f"{self.path} is missing; re-run diffship export")
        self._adaptations = {m.name: (m.dtype, m.layout) for m in self.details.model_inputs}
        self._names = dict(self.details.model_names)
        self.compute_units = compute_units
        self.evaluator = ("coreml" if has_coreml_runtime() else "mil") if evaluator == "auto" else evaluator
        sizes = self.details.sizes
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
            from diffship.runtimes.mil import MilReference

            self._model = MilReference(self.path)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        model_feeds = to_model_inputs(self._adaptations, feeds)
        self._check_size(model_feeds)
        model_feeds = {self._names.get(n, n): v for n, v in model_feeds.items()}
        if self.evaluator == "coreml":
            outputs = self._model.predict(model_feeds)
        else:
            outputs = self._model.run(model_feeds)
        return {name: outputs[self._names.get(name, name)] for name in self.output_names}

    def _check_size(self, model_feeds: dict[str, np.ndarray]) -> None:
        """Enumerated-shape models take exactly their listed shapes."""
        for spec in self.details.model_inputs:
            shapes = [tuple(s) for s in spec.shapes]
            got = tuple(model_feeds[spec.name].shape)
            if got not in shapes:
                raise ShapeError(f"{self.name}: input {spec.name} has shape {got}, but this Core ML export takes "
                                 f"{' or '.join(map(str, shapes))}{self.shape_note}; {self.shape_advice}")

    def close(self) -> None:
        self._model = None
        super().close()

    def describe(self) -> str:
        if self.evaluator == "coreml":
            return f"Core ML runtime (macOS, compute units {self.compute_units})"
        return f"MIL reference ({platform.system()})"

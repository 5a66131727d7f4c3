"""OpenVINO Runtime: compiled IR per component, reshaped to static shapes per request shape.

Static shapes are the largest single CPU speed-up Intel reports for diffusion models, so by default
each new combination of input shapes is compiled once as a static model and kept; later calls with
the same shapes reuse it (``compiles`` counts compilations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffship.backends.manifest import ComponentEntry
from diffship.backends.openvino import MODEL_FILE, OpenVINORuntimeOptions
from diffship.errors import ExportedModelError, RuntimeFailure, first_line
from diffship.runtimes.base import Runner


class OVRunner(Runner):
    """One OpenVINO model per component, compiled per input-shape signature (options:
    :class:`OpenVINORuntimeOptions`)."""

    def __init__(self, folder: Path, entry: ComponentEntry, options: OpenVINORuntimeOptions):
        super().__init__(folder, entry, options)
        import openvino as ov

        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            raise ExportedModelError(f"{path} is missing; re-run diffship export")
        self._core = ov.Core()
        self._version = ov.__version__
        self.ov_device = options.device
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                                       "INFERENCE_PRECISION_HINT": options.inference_precision}
        if options.threads:
            self.config["INFERENCE_NUM_THREADS"] = options.threads
        if options.cache_dir:
            self.config["CACHE_DIR"] = str(options.cache_dir)
        self.config.update(options.ov_config or {})
        try:
            self._model = self._core.read_model(path)
        except Exception as exc:
            raise RuntimeFailure(f"OpenVINO could not read {path} ({first_line(exc)})") from exc
        self.static_shapes = options.static_shapes
        self._compiled: dict[tuple, Any] = {}
        self.compiles = 0

    def _compiled_for(self, feeds: dict[str, np.ndarray]):
        key = tuple(feeds[name].shape for name in self.input_names) if self.static_shapes else ()
        if key not in self._compiled:
            model = self._model
            if self.static_shapes and model.is_dynamic():
                model = model.clone()
                model.reshape({name: list(feeds[name].shape) for name in self.input_names})
            try:
                compiled = self._core.compile_model(model, self.ov_device, self.config)
            except Exception as exc:
                raise RuntimeFailure(f"OpenVINO could not compile {self.name} for {self.ov_device} "
                                     f"({first_line(exc)}); check the device name and ov_config") from exc
            self._compiled[key] = compiled.create_infer_request()
            self.compiles += 1
        return self._compiled[key]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._compiled_for(feeds)
        request.infer(feeds)
        # The request owns its output buffers: copy them before the next call overwrites them.
        return {name: np.array(request.get_tensor(name).data) for name in self.output_names}

    @property
    def compute_precision(self) -> str | None:
        hint = str(self.config["INFERENCE_PRECISION_HINT"]).lower()
        return {"bf16": "bf16", "f16": "fp16"}.get(hint)

    def describe(self) -> str:
        return f"OpenVINO {self._version.split('-')[0]} ({self.ov_device}, {self.config['INFERENCE_PRECISION_HINT']})"

    def close(self) -> None:
        self._compiled.clear()  # compiled models hold most of the runner's memory
        super().close()

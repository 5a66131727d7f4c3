"""OpenVINO Runtime: compiled IR per component, reshaped to static shapes per request shape.

Static shapes are the largest single CPU speed-up Intel reports for diffusion models, so by default
each new combination of input shapes is compiled once as a static model and kept; later calls with
the same shapes reuse it (``compiles`` counts compilations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffship._registry import require_modules
from diffship.errors import ExportedModelError, RuntimeFailure, first_line
from diffship.runtimes.base import Runner, check_options

BACKENDS = ("openvino",)
EXTRA = "openvino"
PACKAGES = ("openvino",)
MODEL_FILE = "openvino_model.xml"
#: OpenVINO's CPU plugin computes in bf16 on CPUs that have it (max error ~3e-2 on the UNet); parity
#: and the default pipeline ask for f32. ``inference_precision="bf16"`` is the speed mode.
DEFAULT_PRECISION = "f32"


class OVRunner(Runner):
    """One OpenVINO model per component, compiled per input-shape signature.

    Args:
        folder: the component folder holding ``openvino_model.xml``.
        component: the component's manifest entry.
        device: OpenVINO device name (``CPU``, ``GPU``, ``NPU``, ``AUTO``...), passed through.
        threads: inference threads (``INFERENCE_NUM_THREADS``).
        inference_precision: ``f32`` (default, exact) or ``bf16``/``f16`` (faster where supported).
        ov_config: further OpenVINO properties, passed through (they win over the above).
        cache_dir: OpenVINO model cache folder (``CACHE_DIR``), reused across processes.
        static_shapes: compile a static model per request shape (default) instead of one dynamic model.
    """

    def __init__(self, folder: Path, component: dict[str, Any], device: str = "CPU", threads: int | None = None,
                 inference_precision: str = DEFAULT_PRECISION, ov_config: dict[str, Any] | None = None,
                 cache_dir: str | None = None, static_shapes: bool = True):
        super().__init__(component["component"], component["inputs"], component["outputs"])
        import openvino as ov

        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            raise ExportedModelError(f"{path} is missing; re-run diffship export")
        self._core = ov.Core()
        self._version = ov.__version__
        self.ov_device = device.upper() if isinstance(device, str) else device
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir:
            self.config["CACHE_DIR"] = str(cache_dir)
        self.config.update(ov_config or {})
        try:
            self._model = self._core.read_model(path)
        except Exception as exc:
            raise RuntimeFailure(f"OpenVINO could not read {path} ({first_line(exc)})") from exc
        self.static_shapes = static_shapes
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


def open_runner(folder: Path, component: dict[str, Any], options: dict[str, Any]) -> OVRunner:
    require_modules(BACKENDS[0], EXTRA, *PACKAGES)
    check_options(OVRunner, options)
    return OVRunner(folder, component, **options)

"""ONNX Runtime: runs ``<component>/model.onnx`` with the CPU provider by default, CUDA/TensorRT on request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffship._registry import require_modules
from diffship.errors import DiffshipError, ExportedModelError, MissingBackendError, RuntimeFailure, first_line
from diffship.runtimes.base import Runner, check_options

BACKENDS = ("onnx",)
EXTRA = "onnx"
PACKAGES = ("onnxruntime",)
#: short provider names accepted by ``device=`` / ``--device``; full names pass through.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
_EXTRA_FOR = {"CUDAExecutionProvider": "onnx-gpu", "TensorrtExecutionProvider": "onnx-gpu"}


def providers_for(device: str | list[str] | None) -> list[str]:
    """Execution providers in priority order, always ending with the CPU provider as fallback.

    Raises:
        DiffshipError: an unknown provider name.
        MissingBackendError: a known provider that this onnxruntime build lacks.
    """
    import onnxruntime as ort

    requested = [device] if isinstance(device, str) else list(device or ["cpu"])
    names = [PROVIDERS.get(p.lower(), p) for p in requested]
    available = ort.get_available_providers()
    for name in names:
        if name in available:
            continue
        if name not in PROVIDERS.values():
            raise DiffshipError(f"unknown onnxruntime provider {name!r}; use one of {', '.join(PROVIDERS)} "
                                f"(this build has: {', '.join(available)})")
        if name in _EXTRA_FOR:
            # onnxruntime and onnxruntime-gpu install the same module: the CPU one must go first.
            raise MissingBackendError(f"onnxruntime provider {name}", "onnxruntime-gpu", _EXTRA_FOR[name],
                                      hint="pip uninstall onnxruntime && ")
        raise DiffshipError(f"onnxruntime provider {name} is not in this onnxruntime build (it has: "
                            f"{', '.join(available)}); install a build that includes it")
    return names + [p for p in ["CPUExecutionProvider"] if p not in names]


class OrtRunner(Runner):
    """One ``onnxruntime.InferenceSession`` per component.

    Args:
        folder: the component folder holding ``model.onnx``.
        component: the component's manifest entry.
        device: execution provider, by short name (``cpu``, ``cuda``, ``tensorrt``...) or full name, or a
            list of them, highest priority first (the CPU provider is always the last fallback).
        threads: intra-op threads (default: onnxruntime's choice, one per core).
        provider_options: per-provider option dicts, in the order of ``device``.
        session_config: ``SessionOptions`` config entries, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` when sharing cores with other work.
    """

    def __init__(self, folder: Path, component: dict[str, Any], device: str | list[str] | None = None,
                 threads: int | None = None, provider_options: list[dict] | None = None,
                 session_config: dict[str, str] | None = None):
        super().__init__(component["component"], component["inputs"], component["outputs"])
        import onnxruntime as ort

        path = Path(folder) / "model.onnx"
        if not path.is_file():
            raise ExportedModelError(f"{path} is missing; re-run diffship export")
        ort.set_default_logger_severity(3)  # failures reach the user as one RuntimeFailure, not log spam
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, str(value))
        providers = providers_for(device)
        if provider_options:
            provider_options = list(provider_options) + [{}] * (len(providers) - len(provider_options))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers,
                                                provider_options=provider_options)
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime could not load {path} "
                                 f"({first_line(exc)})") from exc
        self._version = ort.__version__

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def describe(self) -> str:
        return f"onnxruntime {self._version} ({', '.join(self.session.get_providers())})"


def open_runner(folder: Path, component: dict[str, Any], options: dict[str, Any]) -> OrtRunner:
    require_modules(BACKENDS[0], EXTRA, *PACKAGES)
    check_options(OrtRunner, options)
    return OrtRunner(folder, component, **options)

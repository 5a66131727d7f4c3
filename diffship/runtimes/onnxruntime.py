"""ONNX Runtime: runs ``<component>/model.onnx`` with the CPU provider by default, CUDA/TensorRT on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffship.backends.manifest import ComponentEntry
from diffship.backends.onnx import MODEL_FILE, PROVIDERS, OnnxRuntimeOptions
from diffship.errors import DiffshipError, ExportedModelError, MissingBackendError, RuntimeFailure, first_line
from diffship.runtimes.base import Runner
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
    """One ``onnxruntime.InferenceSession`` per component (options: :class:`OnnxRuntimeOptions`)."""

    def __init__(self, folder: Path, entry: ComponentEntry, options: OnnxRuntimeOptions):
        super().__init__(folder, entry, options)
        import onnxruntime as ort

        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            raise ExportedModelError(f"{path} is missing; re-run diffship export")
        ort.set_default_logger_severity(3)  # failures reach the user as one RuntimeFailure, not log spam
        session = ort.SessionOptions()
        session.log_severity_level = 3
        if threads := options.threads:
            session.intra_op_num_threads = threads
        for key, value in (options.session_config or {}).items():
            session.add_session_config_entry(key, str(value))
        providers = providers_for(options.device)
        provider_options = options.provider_options
        if provider_options:
            provider_options = list(provider_options) + [{}] * (len(providers) - len(provider_options))
        try:
            self.session = ort.InferenceSession(str(path), session, providers=providers,
                                                provider_options=provider_options)
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime could not load {path} "
                                 f"({first_line(exc)})") from exc
        self._version = ort.__version__
        self._providers = self.session.get_providers()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def describe(self) -> str:
        return f"onnxruntime {self._version} ({', '.join(self._providers)})"

    def close(self) -> None:
        self.session = None  # onnxruntime frees a session's memory when it is dropped
        super().close()

"""What a benchmark run measures: :class:`BenchSettings`, and the presets of ``bench_presets.toml``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from diffship.configs.fields import parse
from diffship.configs.toml import read_toml
from diffship.errors import ConfigError

#: Benchmark presets shipped with diffship (``diffship bench --preset NAME``).
BUNDLED_PRESETS = Path(__file__).with_name("bench_presets.toml")
#: the subject name of eager PyTorch in ``backends``.
TORCH = "torch"
AUTO = "auto"
#: the precision of a ``BACKEND-tuned`` subject until ``diffship tune`` has chosen its mode.
TUNED = "tuned"
#: the backends ``diffship tune`` chooses a mode for (its candidates: :func:`diffship.bench.tune.candidates`).
TUNABLE = ("onnx", "openvino")
DEFAULT_SCHEDULER = "default"


@dataclass(frozen=True)
class BenchSettings:
    """Everything that decides what a benchmark run measures (recorded in its results).

    Attributes:
        source: what is benchmarked (a preset name, diffusers folder or single file).
        backends: ``torch`` and export backends; ``auto`` expands to torch + every backend installed.
        precisions: export precisions; each backend x precision is one subject.
        torch_precisions: eager subjects (``fp32``; ``bf16`` is skipped where the hardware lacks it).
        sizes: ``(height, width)`` image sizes; the first is the default, the rest the resolution sweep.
        batches: images per call for the batch sweep (at the default size).
        steps: end-to-end step counts; the first is the default.
        schedulers: scheduler class names for end-to-end runs; ``default`` is the pipeline's own.
        warmup: untimed calls before each timed series.
        repeats: timed calls per component measurement.
        e2e_repeats: timed end-to-end runs per setting.
        prompt / seed / guidance_scale: the generation request of end-to-end runs.
        threads: intra-op threads of every subject (None: each library's default).
        device: where eager PyTorch runs (``cpu``, ``cuda``).
        runtime_options: per backend, options for its runner (``{"onnx": {"device": "cuda"}}``).
        export_options: per backend, export options (``-o`` of ``diffship export``).
        components: export (and measure) only these components; empty: all.
        compare: existing export folders measured beside the run's subjects, as they are (diffship's,
            optimum-onnx's, optimum-intel's, Apple's Core ML): not exported, each named by its folder.
        export_only: measure the exports (time, peak RSS, size) and run nothing -- for sources too large
            to load next to each other, or backends that cannot run here.
        tune: backends (``onnx``, ``openvino``) that also get a ``BACKEND-tuned`` subject: the export
            ``diffship tune`` chooses at the run's default size and steps (reusing the run's exports of the
            precisions it tries), measured with the runtime settings it chose.
        tune_candidates: the modes tune tries (``fp32@f32,full-int8@bf16``); empty: every mode of the backend.
        tune_min_psnr: tune's image PSNR floor (dB) against eager fp32.
    """

    source: str = "tiny"
    backends: tuple[str, ...] = (AUTO,)
    precisions: tuple[str, ...] = ("fp32",)
    torch_precisions: tuple[str, ...] = ("fp32", "bf16")
    sizes: tuple[tuple[int, int], ...] = ((64, 64),)
    batches: tuple[int, ...] = (1,)
    steps: tuple[int, ...] = (4,)
    schedulers: tuple[str, ...] = (DEFAULT_SCHEDULER,)
    warmup: int = 1
    repeats: int = 5
    e2e_repeats: int = 2
    prompt: str = "a photograph of an astronaut riding a horse"
    seed: int = 0
    guidance_scale: float = 7.5
    threads: int | None = None
    device: str = "cpu"
    runtime_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    export_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    components: tuple[str, ...] = ()
    compare: tuple[str, ...] = ()
    export_only: bool = False
    tune: tuple[str, ...] = ()
    tune_candidates: tuple[str, ...] = ()
    tune_min_psnr: float = 35.0

    @property
    def size(self) -> tuple[int, int]:
        return self.sizes[0]

    @property
    def default_steps(self) -> int:
        return self.steps[0]

    def validate(self) -> "BenchSettings":
        """Raise :class:`ConfigError` for settings that cannot be measured; return self."""
        problems = []
        if self.components and not self.export_only:
            problems.append("components selects what is exported; it needs export_only (a pipeline runs all of them)")
        for name in ("backends", "precisions", "sizes", "batches", "steps", "schedulers"):
            if not getattr(self, name):
                problems.append(f"{name} is empty")
        if any(b < 1 for b in self.batches) or any(s < 1 for s in self.steps):
            problems.append("batches and steps must be >= 1")
        if any(h < 8 or w < 8 or h % 8 or w % 8 for h, w in self.sizes):
            problems.append(f"sizes must be positive multiples of 8, got {self.sizes}")
        if self.warmup < 0 or self.repeats < 1 or self.e2e_repeats < 1:
            problems.append("warmup must be >= 0, repeats and e2e_repeats >= 1")
        if unknown := set(self.tune) - set(TUNABLE):
            problems.append(f"tune takes {' and '.join(TUNABLE)}, not {', '.join(sorted(unknown))}")
        if self.tune and self.export_only:
            problems.append("tune runs the pipeline to choose a mode; it cannot be combined with export_only")
        if unknown := set(self.torch_precisions) - {"fp32", "fp16", "bf16"}:
            problems.append(f"unknown torch precision(s) {sorted(unknown)}; choose from fp32, fp16, bf16")
        if problems:
            raise ConfigError("invalid benchmark settings: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sizes"] = [f"{h}x{w}" for h, w in self.sizes]
        return data


def from_mapping(data: dict[str, Any], where: str, base: BenchSettings | None = None) -> BenchSettings:
    """Settings from a preset table or CLI overrides over ``base``; unknown keys and wrong types are errors."""
    given = parse(BenchSettings, data, "setting", where=where)
    values = {k: getattr(given, k) for k in data}
    try:
        return replace(base or BenchSettings(), **values).validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_presets(path: Path | None = None) -> dict[str, BenchSettings]:
    """Every benchmark preset, validated."""
    file = Path(path) if path is not None else BUNDLED_PRESETS
    doc = read_toml(file, "benchmark presets")
    out = {}
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: {name} must be a table of settings")
        out[name] = from_mapping(table, f"{file} [{name}]")
    return out


def preset(name: str) -> BenchSettings:
    presets = load_presets()
    if name not in presets:
        raise ConfigError(f"unknown benchmark preset {name!r}; choose one of: {', '.join(presets)}")
    return presets[name]

"""``diffship bench``: eager PyTorch and exports of the same source, measured side by side.

:func:`run_bench` runs it (settings from :mod:`diffship.bench.settings`, presets in
``configs/bench_presets.toml``); :mod:`diffship.bench.results` documents the results' schema;
:func:`compare` flags regressions between two runs.
"""

from diffship.bench.compare import compare
from diffship.bench.run import run_bench
from diffship.bench.settings import BenchSettings, preset

__all__ = ["BenchSettings", "compare", "preset", "run_bench"]

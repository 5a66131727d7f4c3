"""``diffship bench``: eager PyTorch and exports of the same source, measured side by side.

:func:`run_bench` runs it (:mod:`~.run`; subjects and sweeps from :mod:`~.plan`, workers in :mod:`~.pool`
and :mod:`~.worker`, derived figures in :mod:`~.analysis`); settings are
:class:`~diffship.configs.BenchSettings` (presets in ``configs/bench_presets.toml``); the results are
typed records (:mod:`~.records`, schema ``bench/schema.json``) written by :mod:`~.output`;
:func:`compare` flags regressions between two runs.
"""

from diffship.bench.compare import compare
from diffship.bench.run import run_bench
from diffship.configs.bench_presets import BenchSettings, preset

__all__ = ["BenchSettings", "compare", "preset", "run_bench"]

"""Accuracy benchmarks on lm-eval against the cluster's API.

``run_suite`` (in :mod:`epiconsole.benchmark.suite`) runs the configured suite through lm-eval's own
``evaluate`` in a worker thread, on task objects built once per process (:mod:`.tasksets`);
:func:`warm_up` builds them ahead of time. Importing this package, :mod:`.results`, :mod:`.catalog`,
:mod:`.localdata` or :mod:`.tasksets` never imports lm_eval; only running or warming up a suite does.
"""

from epiconsole.benchmark.results import BenchProgress, BenchResult, Provenance, SampleRecord, TaskScore
from epiconsole.benchmark.tasksets import warm_up

__all__ = ["BenchProgress", "BenchResult", "Provenance", "SampleRecord", "TaskScore", "warm_up"]

"""Accuracy benchmarks on lm-eval against the cluster's API.

``run_suite`` (in :mod:`epiconsole.benchmark.suite`) runs the configured suite through lm-eval's own
``simple_evaluate`` in a worker thread. Importing this package, :mod:`.results`, :mod:`.catalog` or
:mod:`.localdata` never imports lm_eval; only running a suite does.
"""

from epiconsole.benchmark.results import BenchProgress, BenchResult, Provenance, SampleRecord, TaskScore

__all__ = ["BenchProgress", "BenchResult", "Provenance", "SampleRecord", "TaskScore"]

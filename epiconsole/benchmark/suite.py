"""Run the configured benchmark suite with lm-eval against the cluster's API.

``run_suite`` is the entry the engine and ``epiconsole bench`` use. lm-eval is synchronous, so the whole
evaluation runs in a worker thread; its HTTP requests go back to the caller's event loop through
:class:`drivers.dllama_api.SyncDllamaApi`, so they share the loop's client and its one-in-flight lock.
lm_eval is imported on the first call only (in the worker thread, never at module import).

The runner calls lm-eval as a library, not through ``simple_evaluate``: that entry re-loads the tasks
and records its environment on every call (importing torch and transformers and running ``git`` and
pip's metadata scan), over a second per call. Here the tasks are built once per process and reused
(:mod:`epiconsole.benchmark.tasksets`, which resets them around every run), and each run goes through
lm-eval's own ``evaluate``: its request building, filters, metrics and aggregation, unchanged. The
provenance we keep (lm-eval version, task names and versions, shots, limit, seed) is recorded here.
:func:`warm_up` builds all of it ahead of time, outside any measurement window.

Datasets come from the local Hugging Face cache. When the hub cannot be reached, the runner switches the
HF libraries to offline mode before loading, and a dataset missing from the cache becomes one sentence
(UserError) naming the task and the dataset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from drivers.dllama_api import ApiCancelled, ApiError, ApiUnavailable, DllamaApi, SyncDllamaApi
from epiconsole.benchmark import tasksets
from epiconsole.benchmark.catalog import MODELS, PlannedTask, model_spec, plan_tasks
from epiconsole.benchmark.results import (
    BenchProgress,
    BenchResult,
    Provenance,
    SampleRecord,
    TaskScore,
    composite,
)
from epiconsole.benchmark.tasksets import BenchmarkError, warm_up
from epiconsole.config import BenchmarkConfig

log = logging.getLogger(__name__)

#: Where a run is cancelled, how long to wait for lm-eval's thread to notice before giving up on it.
CANCEL_GRACE_S = 30.0
#: Bootstrap resamples for the stderr of metrics without a closed form (exact match has one).
BOOTSTRAP_ITERS = 1000


async def run_suite(
    api_url: str,
    bench_cfg: BenchmarkConfig,
    *,
    simulated: bool,
    on_progress: Callable[[BenchProgress], None] | None = None,
    timeout_s: float = 600.0,
) -> BenchResult:
    """Run ``bench_cfg``'s tasks against the API at ``api_url`` and score them with lm-eval.

    ``on_progress`` is called on the caller's event loop after every request. Cancelling the
    awaiting task stops the run after the request in flight.
    """
    if bench_cfg.model not in MODELS:
        raise BenchmarkError(f"benchmark.model is {bench_cfg.model!r}; expected one of {', '.join(MODELS)}")
    loop = asyncio.get_running_loop()
    api = DllamaApi(api_url, timeout_s)
    client = SyncDllamaApi(api, loop)
    try:
        try:
            model_ids = await api.models()
        except (ApiUnavailable, ApiError) as exc:
            raise BenchmarkError(f"cannot start the benchmark: {exc}") from None
        model_id = model_ids[0] if model_ids else ""

        def progress(done: int, total: int, ledger: Any) -> None:
            if on_progress is not None:
                p = BenchProgress(done, total, ledger.failed_requests, ledger.prompt_tokens, ledger.completion_tokens)
                loop.call_soon_threadsafe(on_progress, p)

        planned = plan_tasks(bench_cfg, simulated=simulated)
        work = asyncio.ensure_future(asyncio.to_thread(
            _evaluate, api_url, model_id, bench_cfg, planned, simulated, client, progress, timeout_s))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            client.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(work, CANCEL_GRACE_S)
            raise
    finally:
        await api.close()


# --------------------------------------------------------------------------------------------------
# In the worker thread


def _evaluate(
    api_url: str,
    model_id: str,
    bench: BenchmarkConfig,
    planned: list[PlannedTask],
    simulated: bool,
    client: SyncDllamaApi,
    progress: Callable[[int, int, Any], None],
    timeout_s: float,
) -> BenchResult:
    t0 = time.monotonic()
    tasksets.quiet_libraries()  # before lm-eval's first import: tqdm reads TQDM_DISABLE when imported
    import numpy as np
    from lm_eval.evaluator import evaluate

    from epiconsole.benchmark import lmeval_models
    from epiconsole.benchmark.lmeval_models import DllamaChatLM, RequestFailed

    spec = model_spec(bench, api_url, model_id, timeout_s)
    with tasksets.lease(bench, planned) as ts:
        if spec.name == "dllama-chat":
            lm = DllamaChatLM(client=client, retries=bench.retries, max_tokens=bench.max_tokens, on_request=progress)
        else:
            try:
                lm = lmeval_models.CountingLocalCompletions(**spec.args)
            except ModuleNotFoundError as exc:  # lm-eval's API models need its [api] extra (tenacity, ...)
                raise BenchmarkError(f"benchmark.model = \"local-completions\" needs lm-eval's API extra ({exc.name or 'a package'} "
                                     "is missing); install it with `pip install 'lm-eval[api]'`") from None
        # What simple_evaluate does before it evaluates: the global seeds (torch's is left alone: setting
        # it would import torch, which the Pi does not have) and each task's shots and few-shot seed.
        random.seed(bench.seed)
        np.random.seed(bench.seed)
        ts.prepare(bench.seed)
        try:
            # The arguments simple_evaluate passes, so the prompts are the same as through it.
            results = evaluate(
                lm=lm,
                task_dict=ts.loaded,
                limit=bench.limit or None,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=True,
                fewshot_as_multiturn=True,
            )
        except RequestFailed as exc:
            raise BenchmarkError(f"the benchmark stopped: {exc}; check the root node's dllama-api") from None
        except ApiCancelled:
            raise asyncio.CancelledError() from None
        except NotImplementedError as exc:
            raise BenchmarkError(str(exc)) from None
        prov_tasks = ts.provenance
    if results is None:  # only on non-zero ranks, which we never are
        raise RuntimeError("lm-eval returned no results")
    return _result(results, lm.ledger, planned, prov_tasks, bench, api_url, model_id, simulated,
                   tasksets.lm_eval_version(), time.monotonic() - t0)


def _metric_key(task_results: dict[str, Any], metric: str) -> str | None:
    """lm-eval's result key (``metric,filter``) for a configured metric: the key itself, else the metric
    under its first filter by name; ``acc`` also finds the ``exact_match`` of generative scoring."""
    keys = sorted(k for k in task_results if "," in k and "_stderr," not in k)
    if metric in keys:
        return metric
    for want in (metric, "exact_match" if metric == "acc" else None):
        for k in keys:
            if want and k.split(",", 1)[0] == want:
                return k
    return None


def _version_of(results: dict[str, Any], name: str) -> str | None:
    """The task's (or group's) version as lm-eval reports it; None where it reports none."""
    v = (results.get("versions") or {}).get(name)
    return None if v is None else str(v)


def _count(results: dict[str, Any], name: str) -> int:
    n = (results.get("n-samples") or {}).get(name)
    if n is not None:
        return int(n.get("effective", n.get("original", 0)))
    return sum(_count(results, child) for child in (results.get("group_subtasks") or {}).get(name, []))


def _leaves(results: dict[str, Any], name: str) -> list[str]:
    children = (results.get("group_subtasks") or {}).get(name)
    if not children:
        return [name]
    return [leaf for c in children for leaf in _leaves(results, c)]


def _result(
    results: dict[str, Any],
    ledger: Any,
    planned: list[PlannedTask],
    prov_tasks: dict[str, dict[str, Any]],
    bench: BenchmarkConfig,
    api_url: str,
    model_id: str,
    simulated: bool,
    lm_eval_version: str,
    duration_s: float,
) -> BenchResult:
    scores: dict[str, TaskScore] = {}
    samples: list[SampleRecord] = []
    for p in planned:
        res = results["results"].get(p.lm_eval_name) or {}
        key = _metric_key(res, p.metric)
        if key is None:
            raise BenchmarkError(
                f"task {p.lm_eval_name} reports no {p.metric!r} metric (it has: "
                f"{', '.join(k for k in res if ',' in k) or 'none'}); set benchmark.tasks.metric"
            )
        metric, filt = key.split(",", 1)
        stderr = res.get(f"{metric}_stderr,{filt}")
        scores[p.key] = TaskScore(
            name=p.lm_eval_name, acc=float(res[key]),
            stderr=float(stderr) if isinstance(stderr, int | float) else None,
            n=_count(results, p.lm_eval_name), metric=key, weight=p.weight, shots=p.shots,
            version=_version_of(results, p.lm_eval_name),
        )
        for leaf in _leaves(results, p.lm_eval_name):
            for s in (results.get("samples") or {}).get(leaf, []):
                toks = ledger.per_prompt.get(s.get("prompt_hash"), (0, 0))
                resp = s.get("filtered_resps") or [""]
                samples.append(SampleRecord(
                    task=leaf, doc_id=int(s.get("doc_id", -1)), prompt_hash=str(s.get("prompt_hash", "")),
                    answer=str(resp[0]), target=str(s.get("target", "")),
                    correct=bool(s.get(metric, 0)), prompt_tokens=toks[0], completion_tokens=toks[1],
                ))
    prov = Provenance(
        lm_eval_version=lm_eval_version, model=bench.model, api_url=api_url, api_model_id=model_id,
        tasks=prov_tasks, limit=bench.limit, seed=bench.seed, simulated=simulated,
    )
    return BenchResult(
        tasks=scores, composite=composite(scores), prompt_tokens=ledger.prompt_tokens,
        completion_tokens=ledger.completion_tokens, requests=ledger.requests,
        failed_requests=ledger.failed_requests, duration_s=duration_s, provenance=prov, samples=tuple(samples),
    )


__all__ = ["BOOTSTRAP_ITERS", "BenchmarkError", "run_suite", "warm_up"]

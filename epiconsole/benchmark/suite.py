"""Run the configured benchmark suite with lm-eval against the cluster's API.

``run_suite`` is the entry the engine and ``epiconsole bench`` use. lm-eval is synchronous, so the whole
evaluation runs in a worker thread; its HTTP requests go back to the caller's event loop through
:class:`drivers.dllama_api.SyncDllamaApi`, so they share the loop's client and its one-in-flight lock.
lm_eval is imported on the first call only (in the worker thread, never at module import), and lm-eval's
task index — which takes seconds to build over its thousands of YAMLs — is built once per process and
kept, so the engine's many calls per matrix pay it once.

Datasets come from the local Hugging Face cache. When the hub cannot be reached, the runner switches the
HF libraries to offline mode before loading, and a dataset missing from the cache becomes one sentence
(UserError) naming the task and the dataset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.dllama_api import ApiCancelled, ApiError, ApiUnavailable, DllamaApi, SyncDllamaApi
from epiconsole.benchmark.catalog import MODELS, PlannedTask, model_spec, plan_tasks
from epiconsole.benchmark.localdata import LOCAL_TASKS, TASKS_DIR
from epiconsole.benchmark.results import (
    BenchProgress,
    BenchResult,
    Provenance,
    SampleRecord,
    TaskScore,
    composite,
)
from epiconsole.config import BenchmarkConfig
from epiconsole.errors import UserError

log = logging.getLogger(__name__)

_TM_LOCK = threading.Lock()
_TASK_MANAGERS: dict[tuple[bool, tuple[str, ...]], Any] = {}
_HUB_CHECKED = False
#: Where a run is cancelled, how long to wait for lm-eval's thread to notice before giving up on it.
CANCEL_GRACE_S = 30.0


class BenchmarkError(UserError):
    """The benchmark could not run or finish (unreachable API, missing dataset, unknown task)."""


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
    include = [str(TASKS_DIR)] + ([str(Path(bench.task_dir).expanduser())] if bench.task_dir else [])
    tm_local = _task_manager(False, include)
    needs_builtin = any(p.lm_eval_name not in tm_local.task_index for p in planned)
    if any(p.lm_eval_name not in LOCAL_TASKS for p in planned):  # a dataset may come from the hub
        _offline_if_unreachable()
    tm = _task_manager(True, include) if needs_builtin else tm_local

    import lm_eval
    from lm_eval import simple_evaluate

    from epiconsole.benchmark import lmeval_models
    from epiconsole.benchmark.lmeval_models import DllamaChatLM, RequestFailed

    objs, prov_tasks = _load_tasks(tm, planned)
    spec = model_spec(bench, api_url, model_id, timeout_s)
    if spec.name == "dllama-chat":
        lm = DllamaChatLM(client=client, retries=bench.retries, max_tokens=bench.max_tokens, on_request=progress)
    else:
        try:
            lm = lmeval_models.CountingLocalCompletions(**spec.args)
        except ModuleNotFoundError as exc:  # lm-eval's API models need its [api] extra (tenacity, ...)
            raise BenchmarkError(f"benchmark.model = \"local-completions\" needs lm-eval's API extra ({exc.name or 'a package'} "
                                 "is missing); install it with `pip install 'lm-eval[api]'`") from None
    try:
        results = simple_evaluate(
            model=lm,
            tasks=objs,
            task_manager=tm,
            limit=bench.limit or None,
            random_seed=bench.seed,
            numpy_random_seed=bench.seed,
            torch_random_seed=None,  # setting it would import torch, which the Pi does not have
            fewshot_random_seed=bench.seed,
            bootstrap_iters=1000,
            log_samples=True,
        )
    except RequestFailed as exc:
        raise BenchmarkError(f"the benchmark stopped: {exc}; check the root node's dllama-api") from None
    except ApiCancelled:
        raise asyncio.CancelledError() from None
    except NotImplementedError as exc:
        raise BenchmarkError(str(exc)) from None
    if results is None:  # only on non-zero ranks, which we never are
        raise RuntimeError("lm-eval returned no results")
    return _result(results, lm.ledger, planned, prov_tasks, bench, api_url, model_id, simulated,
                   lm_eval.__version__ if hasattr(lm_eval, "__version__") else _version(),
                   time.monotonic() - t0)


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _task_manager(include_defaults: bool, include: list[str]) -> Any:
    key = (include_defaults, tuple(include))
    with _TM_LOCK:
        tm = _TASK_MANAGERS.get(key)
        if tm is None:
            _quiet_libraries()
            from lm_eval.tasks import TaskManager

            tm = TaskManager(include_path=list(include), include_defaults=include_defaults)
            _TASK_MANAGERS[key] = tm
        return tm


def _quiet_libraries() -> None:
    """Keep stdout/stderr clean for ``--json`` and the TUI: no progress bars, warnings only."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm_eval", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # lm-eval missing: reported where it is imported
        pass


def _offline_if_unreachable() -> None:
    """Switch the HF libraries offline when the hub cannot be reached, so a cached dataset loads at once
    and a missing one fails at once, instead of after minutes of retries. The hub is probed once per
    process; an explicit HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is respected."""
    global _HUB_CHECKED
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        _set_offline()
        return
    if _HUB_CHECKED:
        return
    _HUB_CHECKED = True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2.0).close()
    except OSError:
        _set_offline()


def _set_offline() -> None:
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # The libraries read these at import; where they are already loaded, switch their constants too.
    if (hub := sys.modules.get("huggingface_hub.constants")) is not None:
        hub.HF_HUB_OFFLINE = True
    if (dconf := sys.modules.get("datasets.config")) is not None:
        dconf.HF_HUB_OFFLINE = True
        if hasattr(dconf, "HF_DATASETS_OFFLINE"):
            dconf.HF_DATASETS_OFFLINE = True


def _spec(entry: Any) -> Any:
    """A task's load spec: its name, or — for a YAML whose ``data_files`` are relative paths — its config
    with those paths resolved against the YAML's directory (lm-eval would resolve them against the cwd)."""
    if entry.yaml_path is None:
        return entry.name
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if cfg.get("task") != entry.name or not files:
        return entry.name
    base = Path(entry.yaml_path).parent

    def resolve(p: Any) -> Any:
        if isinstance(p, str) and not Path(p).is_absolute() and (base / p).exists():
            return str(base / p)
        if isinstance(p, list):
            return [resolve(x) for x in p]
        return p

    files = {k: resolve(v) for k, v in files.items()} if isinstance(files, dict) else resolve(files)
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": files}
    return cfg


def _load_tasks(tm: Any, planned: list[PlannedTask]) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    objs: list[Any] = []
    prov: dict[str, dict[str, Any]] = {}
    for p in planned:
        entry = tm.task_index.get(p.lm_eval_name)
        if entry is None:
            raise BenchmarkError(
                f"lm-eval has no task named {p.lm_eval_name!r} (from benchmark task {p.key!r}); "
                "check the name with `lm_eval ls tasks` or add its YAML to benchmark.task_dir"
            )
        try:
            loaded = tm.load([_spec(entry)])
        except Exception as exc:
            raise _dataset_error(p, entry, exc) from None
        for task in loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=p.shots)
        if p.lm_eval_name in loaded["groups"]:
            objs.append(loaded["groups"][p.lm_eval_name])
        elif p.lm_eval_name in loaded["tasks"]:
            objs.append(loaded["tasks"][p.lm_eval_name])
        else:  # a tag: its tasks, each on its own
            objs.extend(loaded["tasks"].values())
        prov[p.key] = {
            "lm_eval_task": p.lm_eval_name,
            "shots": p.shots,
            "subtasks": sorted(loaded["tasks"]),
            "versions": {n: (t.config.metadata or {}).get("version") for n, t in loaded["tasks"].items()},
        }
    return objs, prov


def _dataset_error(p: PlannedTask, entry: Any, exc: Exception) -> Exception:
    """Translate a dataset that cannot be loaded into one sentence; anything else is a bug and surfaces."""
    mod = type(exc).__module__ or ""
    text = str(exc)
    data_like = (
        isinstance(exc, OSError | ConnectionError)
        or mod.split(".")[0] in ("datasets", "huggingface_hub", "requests", "urllib3", "fsspec")
        or any(w in text.lower() for w in ("offline", "couldn't find", "cache", "connect", "not found"))
    )
    if not data_like:
        return exc
    where = ""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        if entry.yaml_path:
            where = f" ({load_yaml(entry.yaml_path, resolve_func=False).get('dataset_path', '?')})"
    except Exception:  # the message is still useful without the dataset's name
        where = ""
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
    how = ("the Hugging Face hub cannot be reached and it is not in the local cache; load it once on a machine "
           "with network access into this cache (HF_HOME)" if offline else f"it failed to load ({text.splitlines()[0][:160] if text else type(exc).__name__})")
    return BenchmarkError(f"the dataset of task {p.lm_eval_name}{where} is not available: {how}, or pick "
                          "other tasks (the local ones: epi_mmlu_local, epi_arc_local, epi_hellaswag_local)")


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


__all__ = ["BenchmarkError", "run_suite"]

"""lm-eval task objects, built once per process and lent to one run at a time.

Building a suite's tasks is most of lm-eval's fixed cost per run: the task index (thousands of YAMLs,
seconds), then each task's config, filters, metrics and dataset. None of that depends on the run, so
:func:`lease` keeps the built tasks of each (task index, planned tasks) pair for the process and hands
them to one run at a time. What a run does change is reset around it:

* the few-shot samplers' random generators are re-seeded before every run (tasks with lm-eval's default
  sampler draw their shots from it, so an un-reset generator would give the next run other prompts),
* the requests (``Instance`` objects with their responses and filtered responses) are dropped after
  every run, also a failed or cancelled one; lm-eval's ``build_all_requests`` builds new ones anyway.

A second run that wants a set already lent out (two benchmarks at once in one process) gets its own,
freshly built set rather than waiting for or sharing the first one's.

Importing this module never imports lm_eval; building a set does (in the caller's thread: the runner's
worker thread, or the engine's warm-up thread).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epiconsole.benchmark.catalog import PlannedTask
from epiconsole.benchmark.localdata import LOCAL_TASKS, TASKS_DIR
from epiconsole.config import BenchmarkConfig
from epiconsole.errors import UserError

log = logging.getLogger(__name__)

_TM_LOCK = threading.Lock()
_TASK_MANAGERS: dict[tuple[bool, tuple[str, ...]], Any] = {}
_SETS_LOCK = threading.Lock()
_SETS: dict[tuple[Any, ...], TaskSet] = {}
_HUB_CHECKED = False


class BenchmarkError(UserError):
    """The benchmark could not run or finish (unreachable API, missing dataset, unknown task)."""


@dataclass(eq=False)
class TaskSet:
    """One suite's built lm-eval tasks (``loaded`` is ``TaskManager.load``'s dict: tasks, groups, group_map).

    Mutable on purpose: lm-eval's tasks keep each run's requests; :func:`lease` resets them around a run.
    """

    key: tuple[Any, ...]
    loaded: dict[str, Any]
    #: configured task name -> its provenance (lm-eval task, shots, subtasks, versions)
    provenance: dict[str, dict[str, Any]]
    shots: dict[str, int]  # lm-eval leaf task -> few-shot count
    cached: bool
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tasks(self) -> dict[str, Any]:
        return self.loaded["tasks"]

    def prepare(self, seed: int) -> None:
        """Put every task in the state a freshly built one has for this run (as ``simple_evaluate`` would)."""
        for name, task in self.tasks.items():
            task.set_config(key="num_fewshot", value=self.shots[name])
            task.set_fewshot_seed(seed=seed)
            task._instances = None

    def clear(self) -> None:
        """Drop the run's requests, responses and filtered responses."""
        for task in self.tasks.values():
            task._instances = None


def include_paths(bench: BenchmarkConfig) -> list[str]:
    """Where lm-eval looks for our task YAMLs (and the config's own ``task_dir``)."""
    return [str(TASKS_DIR)] + ([str(Path(bench.task_dir).expanduser())] if bench.task_dir else [])


def task_manager(include_defaults: bool, include: list[str]) -> Any:
    """lm-eval's task index over ``include`` (plus its thousands of built-in YAMLs), once per process."""
    key = (include_defaults, tuple(include))
    with _TM_LOCK:
        tm = _TASK_MANAGERS.get(key)
        if tm is None:
            quiet_libraries()
            from lm_eval.tasks import TaskManager

            tm = TaskManager(include_path=list(include), include_defaults=include_defaults)
            _TASK_MANAGERS[key] = tm
        return tm


def resolve_manager(bench: BenchmarkConfig, planned: list[PlannedTask]) -> Any:
    """The smallest task index that knows every planned task (ours only, unless one is lm-eval's own)."""
    include = include_paths(bench)
    tm_local = task_manager(False, include)
    needs_builtin = any(p.lm_eval_name not in tm_local.task_index for p in planned)
    if any(p.lm_eval_name not in LOCAL_TASKS for p in planned):  # a dataset may come from the hub
        _offline_if_unreachable()
    return task_manager(True, include) if needs_builtin else tm_local


#: Compiled prompt templates kept per process (our suites use a few dozen distinct template strings).
TEMPLATE_CACHE_SIZE = 4096


def cache_templates() -> None:
    """Make lm-eval compile each prompt template once per process instead of once per use.

    ``lm_eval.utils.apply_template`` parses and compiles its Jinja template on every call: several
    times per prompt (description, question and target of each shot), about three quarters of a
    warmed-up run's CPU time. The replacement compiles with lm-eval's own Jinja environment and keeps
    the compiled template, so every prompt renders exactly as before. Idempotent.
    """
    from lm_eval import utils

    if getattr(utils.apply_template, "epiconsole_cached", False):
        return
    env = utils.env

    @functools.lru_cache(maxsize=TEMPLATE_CACHE_SIZE)
    def compiled(template: str) -> Any:
        return env.from_string(template)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template.epiconsole_cached = True  # type: ignore[attr-defined]
    apply_template.uncached = utils.apply_template  # type: ignore[attr-defined]
    utils.apply_template = apply_template


@contextlib.contextmanager
def lease(bench: BenchmarkConfig, planned: list[PlannedTask]) -> Iterator[TaskSet]:
    """The built tasks of ``planned``, for this run alone; their requests are dropped when it ends."""
    cache_templates()
    tm = resolve_manager(bench, planned)
    key = (id(tm), tuple((p.key, p.lm_eval_name, p.shots) for p in planned))
    with _SETS_LOCK:
        ts = _SETS.get(key)
    if ts is None or not ts.lock.acquire(blocking=False):
        if ts is None:
            ts = _build(tm, planned, key, cached=True)
            with _SETS_LOCK:
                ts = _SETS.setdefault(key, ts)  # another thread may have built it meanwhile
        if not ts.lock.acquire(blocking=False):
            ts = _build(tm, planned, key, cached=False)
            ts.lock.acquire()
    try:
        yield ts
    finally:
        ts.clear()
        ts.lock.release()


def warm_up(bench: BenchmarkConfig, *, simulated: bool = False) -> None:
    """Import lm-eval and build the suite's tasks now, so that no measurement window pays for it.

    A suite that cannot be built (unknown task, missing dataset) is left for the benchmark stage to
    report; anything else is a bug and surfaces.
    """
    from epiconsole.benchmark.catalog import plan_tasks

    planned = plan_tasks(bench, simulated=simulated)
    quiet_libraries()  # before lm-eval's first import: tqdm reads TQDM_DISABLE when imported
    import lm_eval.evaluator  # noqa: F401  (the module the runner calls; its first import takes seconds)

    try:
        with lease(bench, planned):
            pass
    except BenchmarkError as exc:
        log.info("benchmark warm-up: %s", exc)


def lm_eval_version() -> str:
    from importlib.metadata import version

    import lm_eval

    return str(getattr(lm_eval, "__version__", None) or version("lm_eval"))


# --------------------------------------------------------------------------------------------------


def _build(tm: Any, planned: list[PlannedTask], key: tuple[Any, ...], *, cached: bool) -> TaskSet:
    objs, prov = _load_tasks(tm, planned)
    loaded = tm.load(objs)
    shots: dict[str, int] = {}
    for p in planned:
        for leaf in prov[p.key]["subtasks"]:
            shots[leaf] = p.shots
    return TaskSet(key=key, loaded=dict(loaded), provenance=prov, shots=shots, cached=cached)


def quiet_libraries() -> None:
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


__all__ = ["BenchmarkError", "TaskSet", "cache_templates", "include_paths", "lease", "lm_eval_version", "quiet_libraries",
           "resolve_manager", "task_manager", "warm_up"]

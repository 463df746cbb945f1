"""``epiconsole bench``: run the benchmark suite once against the cluster's API (or the simulated one)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from epiconsole.cli import add_config_argument

if TYPE_CHECKING:
    from epiconsole.config import BenchmarkConfig, LabConfig

HELP = "run the accuracy benchmark suite (lm-eval) once against the cluster's dllama-api"


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--sim", action="store_true",
                        help="start a simulated lab serving the baseline model and use the local tasks")
    parser.add_argument("--tasks", nargs="+", metavar="NAME[:SHOTS]",
                        help="tasks to run instead of the config's (commas also separate names); "
                        "mmlu, arc_challenge, hellaswag or any lm-eval task name")
    parser.add_argument("--limit", type=int, metavar="N", help="items per task (0: all)")
    parser.add_argument("--url", metavar="URL", help="the API's base URL (default: from the config's [cluster])")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--full", action="store_true",
                        help="with --json: add provenance and the per-item records")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import sys

    from epiconsole import config
    from epiconsole.benchmark.results import BenchProgress, BenchResult
    from epiconsole.errors import UserError

    cfg = config.load(args.config)
    bench = _bench_config(cfg.benchmark, args.tasks, args.limit)
    simulated = args.sim or (cfg.simulated and not args.url)
    show_progress = not args.json and sys.stderr.isatty()

    def on_progress(p: BenchProgress) -> None:
        if show_progress:
            total = f"/{p.total}" if p.total else ""
            print(f"\r{p.done}{total} requests, {p.failed_requests} failed, "
                  f"{p.prompt_tokens + p.completion_tokens} tokens", end="", file=sys.stderr, flush=True)

    async def main() -> BenchResult:
        from epiconsole.benchmark.suite import run_suite

        if not simulated:
            url = args.url or api_url(cfg)
            # Here the API is real: an explicit --url is never labelled simulated, even with no lab config.
            return await run_suite(url, bench, simulated=False,
                                   on_progress=on_progress, timeout_s=cfg.cluster.api_timeout_s)
        from epiconsole.sim.api import SimApi
        from epiconsole.sim.physics import Deployed
        from epiconsole.sim.state import SimLab

        lab = SimLab(config.sim_defaults())
        lab.deployed = Deployed("baseline")
        api = SimApi(lab)
        await api.start(0)
        try:
            return await run_suite(api.url, bench, simulated=True, on_progress=on_progress)
        finally:
            await api.stop()

    if bench.limit < 0:
        raise UserError("--limit must be 0 (all items) or a positive number of items per task")
    try:
        result = asyncio.run(main())
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("lm_eval", "datasets"):
            raise UserError("the benchmark needs lm-eval; install it with `pip install 'epiconsole[bench]'`") from None
        raise
    if show_progress:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict() if args.full else result.summary(), indent=2))
        return 0
    label = " (SIMULATED)" if result.simulated else ""
    print(f"benchmark{label}: {result.provenance.api_model_id or '?'} at {result.provenance.api_url}, "
          f"lm-eval {result.lm_eval_version}")
    print(f"{'task':<16} {'lm-eval task':<22} {'shots':>5} {'n':>6} {'acc':>7} {'stderr':>7} {'weight':>6}")
    for key, t in result.tasks.items():
        se = f"{t.stderr:.3f}" if t.stderr is not None else "-"
        print(f"{key:<16} {t.name:<22} {t.shots:>5} {t.n:>6} {t.acc:>7.3f} {se:>7} {t.weight:>6g}")
    print(f"composite accuracy {result.composite:.3f}; tokens: {result.prompt_tokens} prompt + "
          f"{result.completion_tokens} completion; {result.requests} requests, {result.failed_requests} failed; "
          f"{result.duration_s:.1f} s")
    return 0


def api_url(cfg: LabConfig) -> str:
    """The root node's dllama-api URL from the config: ``cluster.api_host`` or the root's SSH address."""
    host = cfg.cluster.api_host or cfg.hosts[cfg.cluster.root].address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{cfg.cluster.api_port}"


def _bench_config(base: BenchmarkConfig, tasks: list[str] | None, limit: int | None) -> BenchmarkConfig:
    """The config's benchmark section with the command line's --tasks and --limit applied."""
    import dataclasses

    from epiconsole.config import TaskConfig
    from epiconsole.errors import UserError

    out = base
    if tasks:
        known = {t.name: t for t in base.tasks}
        chosen: list[TaskConfig] = []
        for word in (w for arg in tasks for w in arg.split(",") if w.strip()):
            name, _, shots = word.strip().partition(":")
            if shots and not shots.isdigit():
                raise UserError(f"--tasks {word}: the shot count after ':' must be a whole number, e.g. mmlu:5")
            t = known.get(name, TaskConfig(name))
            chosen.append(dataclasses.replace(t, shots=int(shots)) if shots else t)
        out = dataclasses.replace(out, tasks=tuple(chosen))
    if limit is not None:
        out = dataclasses.replace(out, limit=limit)
    return out

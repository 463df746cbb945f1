"""``epiconsole matrix``: print the plan the lab config selects."""

from __future__ import annotations

import argparse
import json

from epiconsole.cli import add_config_argument

HELP = "print the experiment plan (configurations x repetitions)"


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--plan", metavar="FILE_OR_NAME", help="a plan TOML file or a built-in plan name "
                        "(pruning, baseline-study); default: the config's [plan]")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from epiconsole import config, matrix

    cfg = config.load(args.config)
    if args.plan:
        plan = matrix.load_plan(args.plan) if Path(args.plan).suffix == ".toml" else matrix.builtin(args.plan)
    else:
        plan = matrix.plan_for(cfg)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    print(f"{plan.name}: {plan.description}")
    print(f"{len(plan.configurations)} configurations x {plan.repetitions} repetitions = {len(plan.trials())} trials")
    print(f"{'#':>3}  {'id':<16} {'model':<18} {'experts':>7}  {'target':<6} {'strategy':<8} stages")
    for c in plan.configurations:
        print(f"{c.order:>3}  {c.id:<16} {c.model:<18} {c.experts:>7}  {c.target or '-':<6} "
              f"{c.strategy or '-':<8} {len(c.stages)}")
    return 0

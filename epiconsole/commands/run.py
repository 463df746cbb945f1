"""``epiconsole run``: run the plan (headless here; the console's Matrix screen does the same)."""

from __future__ import annotations

import argparse

from epiconsole.cli import add_config_argument

HELP = "run the experiment plan: --headless for scripts (exit 0 all valid, 1 some invalid, 2 usage, 3 aborted)"


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--headless", action="store_true", help="no console: progress lines (rich on a terminal)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per event (implies --headless)")
    parser.add_argument("--sim", action="store_true", help="start the embedded simulated lab and run on it")
    parser.add_argument("--sim-dir", metavar="DIR", help="where the simulated lab keeps its files "
                        "(default: beside the ledger, so --resume finds its models)")
    parser.add_argument("--only", metavar="IDS", help="comma-separated configuration ids (see `epiconsole matrix`)")
    parser.add_argument("--reps", type=int, metavar="N", help="repetitions per configuration")
    parser.add_argument("--resume", action="store_true",
                        help="continue the latest unfinished campaign at its first unfinished stage")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and the expected duration without touching hardware")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from epiconsole import config
    from epiconsole.errors import UserError
    from epiconsole.headless import RunOptions
    from epiconsole.headless import run as run_headless

    if not (args.headless or args.json or args.dry_run):
        raise UserError("the console's run view is the Matrix screen (run `epiconsole`); "
                        "use `epiconsole run --headless` for scripts")
    if args.reps is not None and args.reps < 1:
        raise UserError("--reps: expected a positive number of repetitions")
    only = tuple(i.strip() for i in (args.only or "").split(",") if i.strip())
    cfg = config.load(args.config)
    opts = RunOptions(only=only, reps=args.reps, resume=args.resume, json=args.json, dry_run=args.dry_run,
                      sim=args.sim or cfg.simulated, sim_dir=args.sim_dir)
    return asyncio.run(run_headless(cfg, opts))

"""``epiconsole doctor``: check the meter, every SSH host and the API; say what is wrong and what to do."""

from __future__ import annotations

import argparse

from epiconsole.cli import add_config_argument

HELP = "check the meter, every SSH host and the API; says what is wrong and how to fix it"


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--sim", action="store_true", help="start the simulated lab and check it")
    parser.add_argument("--json", action="store_true", help='print {"checks": [{"name", "ok", "detail"}, ...]}')


def run(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import json
    import sys

    from epiconsole import config
    from epiconsole.doctor import Check, run_checks

    def show(check: Check) -> None:
        if not args.json:
            mark = "ok  " if check.ok else "FAIL"
            print(f"{mark} {check.name:<6} {check.detail}", flush=True)

    async def main() -> list[Check]:
        cfg = config.load(args.config)
        if args.sim or (cfg.simulated and not cfg.source):
            from epiconsole.sim.lab import SimulatedLab

            base = dataclasses.replace(cfg, lab=dataclasses.replace(cfg.lab, simulated=True))
            async with SimulatedLab(base) as lab:
                assert lab.config is not None
                return await run_checks(lab.config, show)
        return await run_checks(cfg, show)

    checks = asyncio.run(main())
    if args.json:
        print(json.dumps({"checks": [c.to_dict() for c in checks]}, indent=2))
    failed = [c.name for c in checks if not c.ok]
    if failed and not args.json:
        print(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0

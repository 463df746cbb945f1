"""``epiconsole sim``: run the simulated lab standalone and print a lab config that points at it."""

from __future__ import annotations

import argparse

from epiconsole.cli import add_config_argument

HELP = "run the simulated lab standalone; prints the path of a lab config that points at it"


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--dir", metavar="DIR", help="where the lab keeps its files (default: a new temporary directory)")
    parser.add_argument("--seed", type=int, help="physics and fault seed (default: the config's [sim] seed)")
    parser.add_argument("--time-scale", type=float, help="simulated seconds per real second")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import signal
    import sys

    from epiconsole import config
    from epiconsole.sim.lab import SimulatedLab

    base = config.load(args.config)
    base = dataclasses.replace(base, lab=dataclasses.replace(base.lab, simulated=True))
    if args.seed is not None:
        base = dataclasses.replace(base, sim=dataclasses.replace(base.sim, seed=args.seed))
    if args.time_scale is not None:
        base = dataclasses.replace(base, sim=dataclasses.replace(base.sim, time_scale=args.time_scale))

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with SimulatedLab(base, args.dir) as lab:
            print(lab.config_path, flush=True)
            print(f"simulated lab running (seed {base.sim.seed}, x{base.sim.time_scale:g} time); "
                  f"use: epiconsole --config {lab.config_path}   (Ctrl-C stops it)", file=sys.stderr, flush=True)
            await stop.wait()

    asyncio.run(serve())
    return 0

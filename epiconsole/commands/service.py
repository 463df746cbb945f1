"""``epiconsole service``: the lab service without a console (for systemd); runs until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

from epiconsole.cli import add_config_argument

HELP = "run the lab service (owns the meter, the SSH hosts and the ledger) until SIGTERM or Ctrl-C"


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--sim", action="store_true", help="start the embedded simulated lab and serve it")
    parser.add_argument("--sim-dir", metavar="DIR", help="where the simulated lab keeps its files")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import os
    import signal
    import sys

    from epiconsole import config
    from epiconsole.headless import SimProcess, sim_config, sim_dir_for
    from epiconsole.service import LabService, ServiceLock, ServiceRunning

    cfg = config.load(args.config)
    sim = args.sim or cfg.simulated
    if sim:
        cfg = sim_config(cfg)
    pid = ServiceLock.holder(cfg.ledger_path())
    if pid is not None:  # refuse before starting a simulated lab for nothing
        raise ServiceRunning(f"a lab service is already running (pid {pid or 'unknown'}) for {cfg.ledger_path()}; "
                             "use it (epiconsole status, or the console) or stop it first")

    async def serve() -> None:
        nonlocal cfg
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with contextlib.AsyncExitStack() as stack:
            if sim:
                cfg = await stack.enter_async_context(SimProcess(cfg, sim_dir_for(cfg, args.sim_dir)))
            service = LabService(cfg)
            await service.start()
            stack.push_async_callback(service.stop)
            print(f"lab service running (pid {os.getpid()}) on {cfg.ledger_path()}"
                  f"{' with the simulated lab' if sim else ''}; Ctrl-C or SIGTERM stops it",
                  file=sys.stderr, flush=True)
            await stop.wait()

    asyncio.run(serve())
    return 0

"""``epiconsole serve``: the console in a browser (textual-serve), bound to localhost and view-only
unless the lab config says otherwise (``[web] host``, ``port``, ``allow_control``).

Every browser tab runs its own console process that attaches to the running lab service as a viewer
(``epiconsole tui --viewer``: it never starts a service and shows the ledger's state, waiting for a service
when none runs yet), so closing a tab never touches the run.
"""

from __future__ import annotations

import argparse

from epiconsole.cli import add_config_argument

HELP = "the console in a browser (textual-serve); localhost and view-only unless [web] allows more"


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument("--host", help="address to bind (default: [web] host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: [web] port, 8000)")


def console_command(config: str | None, allow_control: bool) -> str:
    """The shell command each browser session runs (quoted: paths may contain spaces)."""
    import shlex
    import sys

    argv = [sys.executable, "-m", "epiconsole", "tui", "--viewer"]
    if config:
        argv += ["--config", config]
    if not allow_control:
        argv.append("--view-only")
    return shlex.join(argv)


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from epiconsole import config
    from epiconsole.commands.tui import service_alive
    from epiconsole.errors import UserError

    cfg = config.load(args.config)
    host = args.host or cfg.web.host
    port = args.port or cfg.web.port
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: expected a TCP port 1-65535.")
    try:
        from textual_serve.server import Server
    except ImportError:
        raise UserError("The web view needs textual-serve: pip install textual-serve.") from None
    cfg_path = args.config or os.environ.get(config.ENV_VAR) or (cfg.source or None)
    command = console_command(cfg_path, cfg.web.allow_control)
    if not service_alive(cfg.ledger_path()):
        print("epiconsole serve: no lab service is running yet; browser sessions will say so until "
              "`epiconsole` or `epiconsole service` runs.", file=sys.stderr)
    mode = "with control" if cfg.web.allow_control else "view-only"
    print(f"epiconsole serve: http://{host}:{port} ({mode}); Ctrl-C stops it", file=sys.stderr, flush=True)
    Server(command, host=host, port=port, title="epiconsole").serve()
    return 0

"""Command-line entry point.

Every subcommand is a module in ``epiconsole.commands`` exposing ``HELP`` (one line),
``configure(parser)`` and ``run(args) -> int``. Those modules import only what argument parsing
needs; heavy imports (Textual, torch, lm_eval) happen inside ``run``, so ``epiconsole --help``
stays fast and the headless commands never load Textual.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from epiconsole import __version__
from epiconsole.errors import UserError

DEFAULT_COMMAND = "tui"


def _command_modules() -> list[str]:
    import epiconsole.commands as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epiconsole",
        description="Mission control for an Energy-Per-Intelligence lab. With no command, opens the "
        "console (on the embedded simulated lab when no lab config is found).",
    )
    parser.add_argument("--version", action="version", version=f"epiconsole {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        module = importlib.import_module(f"epiconsole.commands.{name}")
        cli_name = getattr(module, "NAME", name)
        sub = subparsers.add_parser(cli_name, help=module.HELP, description=module.HELP)
        module.configure(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = {a for a in parser._subparsers._group_actions[0].choices}  # type: ignore[union-attr]
    if DEFAULT_COMMAND in known and (not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"))):
        argv = [DEFAULT_COMMAND, *argv]
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"epiconsole: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("epiconsole: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and friends: not an error. Silence the flush at exit.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--config`` option every lab-facing command shares."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="lab config (TOML); default: $EPICONSOLE_CONFIG, then the XDG config dir, "
        "then the simulated lab",
    )

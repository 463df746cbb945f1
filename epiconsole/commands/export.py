"""``epiconsole export``: the paper's data/ layout, summary CSVs and the markdown report of a campaign."""

from __future__ import annotations

import argparse

from epiconsole.cli import add_config_argument

HELP = "export a campaign: the paper's data/ layout (run, power trace, benchmark, EPI per repetition), CSVs, report.md"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("After writing, the export is read back and checked (EPI = J/token / accuracy, J/token = "
                     "joules / tokens, power trace integral within 1%). Exit status: 0 written and consistent, "
                     "1 a consistency check failed (listed), 2 usage or ledger error.")
    add_config_argument(parser)
    parser.add_argument("--out", metavar="DIR", default="data", help="directory to write (default: ./data)")
    parser.add_argument("--campaign", metavar="ID", type=int, help="campaign to export (default: the latest)")
    parser.add_argument("--ledger", metavar="FILE", help="read this ledger file instead of the config's")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty directory that is not an earlier export")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object")


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from pathlib import Path

    from epiconsole import config
    from epiconsole.errors import UserError
    from epiconsole.export import ExportResult, check_out_dir, export_campaign, verify
    from epiconsole.ledger import Ledger

    cfg = config.load(args.config)
    path = Path(args.ledger).expanduser() if args.ledger else cfg.ledger_path()
    if not path.exists():
        raise UserError(f"No ledger at {path}: nothing to export yet; run a campaign first (`epiconsole run`).")
    out = Path(args.out).expanduser()
    check_out_dir(out, force=args.force)

    async def go() -> ExportResult:
        async with await Ledger.open(path, readonly=True) as ledger:
            return await export_campaign(ledger, out, campaign_id=args.campaign, cfg=cfg, force=args.force)

    result = asyncio.run(go())
    checked, problems = verify(out, cfg.thresholds.gap_limit_s)
    problems = list(dict.fromkeys([*result.problems, *problems]))
    summary = {
        "out": str(result.out),
        "campaign_id": result.campaign_id,
        "simulated": result.simulated,
        "repetitions": len(result.trials),
        "complete": result.complete,
        "valid": sum(1 for t in result.trials if t.valid),
        "files": result.files,
        "checked": checked,
        "problems": problems,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        sim = " (SIMULATED DATA)" if summary["simulated"] else ""
        print(f"campaign {summary['campaign_id']}{sim}: {summary['complete']} complete repetitions "
              f"({summary['valid']} valid) of {summary['repetitions']} exported to {summary['out']}, "
              f"{summary['files']} files; report: {Path(summary['out']) / 'report.md'}")
        if problems:
            print(f"{len(problems)} consistency problem(s):")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"consistency checks passed for {checked} repetitions")
    # A consistency problem is a finding about the data, not a usage error: exit 1 so scripts notice.
    return 1 if problems else 0

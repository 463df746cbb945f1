"""``epiconsole surgeon inspect|profile|drop|validate|synth``: the DGX-side toolkit.

With ``--json`` every command writes one JSON object per line on stdout (``start``, ``tensor``,
``shard``, ``check``, ``done``, ``error`` ...) so the console can stream it over SSH. Exit codes:
0 success, 1 a validation failed or an internal error, 2 a usage error (message in one sentence).
Only ``profile`` and validation's generation step import torch/transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = "DGX-side surgery: inspect a MoE checkpoint, profile its routers, drop experts, validate the result"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="surgeon_command", metavar="ACTION", required=True)

    p = sub.add_parser("inspect", help="architecture, experts, routers, shards, dtypes, earlier surgery")
    p.add_argument("dir", type=Path, help="checkpoint directory (config.json + safetensors)")
    _json(p)

    p = sub.add_parser("profile", help="router frequency per layer and expert on calibration text (torch)")
    p.add_argument("dir", type=Path, help="checkpoint directory")
    p.add_argument("--text", type=Path, nargs="+", required=True, metavar="FILE", help="calibration text files")
    p.add_argument("--max-tokens", type=int, default=65536, metavar="N", help="tokens to profile (default 65536)")
    p.add_argument("--seq-len", type=int, default=512, metavar="N", help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, required=True, metavar="PROFILE.json", help="where to write the profile")
    _json(p)

    p = sub.add_parser("drop", help="drop the N least-routed experts per targeted layer")
    p.add_argument("dir", type=Path, help="source checkpoint directory (never modified)")
    p.add_argument("--experts", type=int, required=True, metavar="N", help="experts to drop per targeted layer")
    p.add_argument("--layers", choices=("all", "early", "late"), default="all",
                   help="all, early (first quarter of MoE layers) or late (last quarter)")
    p.add_argument("--strategy", choices=("remove", "mask", "zero"), default="remove",
                   help="remove (physical, uniform only), mask (-inf router logit at run time), zero (weights zeroed)")
    p.add_argument("--profile", type=Path, required=True, metavar="PROFILE.json", help="router-frequency profile")
    p.add_argument("--out", type=Path, required=True, metavar="OUT", help="output directory (must not exist, or hold this surgery)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="shards written at once (default: CPU count, at most 8)")
    p.add_argument("--no-hash-cache", action="store_true", help="hash the source shards again instead of using the cache")
    _json(p)

    p = sub.add_parser("validate", help="structural checks, manifest, NaN/Inf, then a short generation")
    p.add_argument("dir", type=Path, metavar="OUT", help="surgery output (or any checkpoint) directory")
    p.add_argument("--no-generate", action="store_true", help="skip loading the model with transformers")
    p.add_argument("--quick", action="store_true", help="skip re-hashing the shards against the manifest")
    _json(p)

    p = sub.add_parser("synth", help="write a tiny random Qwen3-MoE checkpoint (simulated) and its profile")
    p.add_argument("dir", type=Path, help="directory to create")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=Path, metavar="PROFILE.json", help="also write a synthetic profile here")
    _json(p)


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="JSON-lines progress on stdout")


def run(args: argparse.Namespace) -> int:
    from epiconsole.errors import UserError
    from epiconsole.surgeon.progress import Progress

    progress = Progress(json_mode=args.json)
    previous = _exit_cleanly_on_sigterm()
    try:
        return _dispatch(args, progress)
    except UserError as exc:
        if args.json:
            progress.emit("error", message=str(exc))
            return exc.exit_code
        raise
    except Exception as exc:
        if args.json:  # the console still gets an event; the traceback goes to stderr
            progress.emit("error", message=f"internal error: {type(exc).__name__}: {exc}")
        raise
    finally:
        import signal

        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored
                signal.signal(signum, handler)


def _exit_cleanly_on_sigterm() -> dict[int, Any]:
    """Turn SIGTERM/SIGHUP (a job cancelled by the console) into SystemExit, so ``drop`` removes its
    temporary output instead of leaving it behind; returns the previous handlers (none off the main
    thread, where handlers cannot be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    # The console runs jobs under a pty: cancelling one hangs up the remote shell (SIGHUP).
    return {signum: signal.signal(signum, _exit_on_signal) for signum in (signal.SIGTERM, signal.SIGHUP)}


def _exit_on_signal(signum: int, _frame: object) -> None:
    sys.exit(128 + signum)


def _dispatch(args: argparse.Namespace, progress) -> int:  # noqa: ANN001 - Progress imported lazily
    action = args.surgeon_command
    if action == "inspect":
        from epiconsole.surgeon.inspection import format_summary, inspect_checkpoint

        summary = inspect_checkpoint(args.dir)
        if args.json:
            progress.emit("inspect", **summary)
        else:
            print(format_summary(summary))
        return 0
    if action == "profile":
        from epiconsole.surgeon.profiler import profile_checkpoint, read_texts

        _check_writable_parent(args.out)  # before minutes of profiling, not after
        profile = profile_checkpoint(
            args.dir,
            read_texts(args.text),
            max_tokens=args.max_tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            device=args.device,
            progress=progress,
        )
        _write_json(args.out, profile)
        progress.emit("done", out=str(args.out), tokens=profile["tokens"], top_k=profile["top_k"])
        return 0
    if action == "drop":
        from epiconsole.surgeon.drop import drop_experts
        from epiconsole.surgeon.hashcache import HashCache

        drop_experts(
            args.dir,
            experts=args.experts,
            layers=args.layers,
            strategy=args.strategy,
            profile=args.profile,
            out=args.out,
            progress=progress,
            workers=args.workers or None,
            hash_cache=HashCache(enabled=not args.no_hash_cache),
        )
        return 0
    if action == "validate":
        from epiconsole.surgeon.validate import validate_checkpoint

        checks = validate_checkpoint(args.dir, generate=not args.no_generate, hashes=not args.quick, progress=progress)
        ok = all(c.ok for c in checks)
        failed = [c.name for c in checks if not c.ok]
        if failed:
            first = next(c for c in checks if not c.ok)
            # One sentence the console can show as the stage's failure reason.
            progress.emit("error", message=f"validation failed: {first.name}: {first.detail}")
        progress.emit("done", out=str(args.dir), ok=ok, failed=failed)
        return 0 if ok else 1
    if action == "synth":
        from epiconsole.surgeon.synth import make_profile, make_tiny_checkpoint

        out = make_tiny_checkpoint(
            args.dir,
            layers=args.layers,
            experts=args.experts,
            top_k=args.top_k,
            shards=args.shards,
            dtype=args.dtype,
            seed=args.seed,
        )
        if args.profile:
            _write_json(args.profile, make_profile(out, args.seed))
        progress.emit("done", out=str(out), profile=str(args.profile) if args.profile else None, simulated=True)
        return 0
    raise AssertionError(action)


def _check_writable_parent(path: Path) -> None:
    from epiconsole.errors import UserError

    if not path.parent.is_dir():
        raise UserError(f"Cannot write {path}: {path.parent} does not exist; create it or choose another path.")


def _write_json(path: Path, data: object) -> None:
    from epiconsole.errors import UserError

    try:
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"Cannot write {path}: {exc.strerror or exc}; check the directory exists.") from None
    sys.stdout.flush()

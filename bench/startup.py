"""Start-up budget (DESIGN.md §6): ``epiconsole --help`` <= 0.3 s, and no heavy import on the headless path.

Times the whole process (interpreter start included) as the user sees it, best of N runs, next to a
bare ``python -c pass`` measured in the same run as the reference, and lists heavy modules imported.
Prints figures and one JSON line; exits 1 when a target is missed.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

RUNS = 15
HEAVY = ("textual", "torch", "transformers", "lm_eval", "safetensors")
TARGET_HELP_S = 0.3


def best_of(cmd: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return min(times)


def heavy_modules(args: list[str]) -> list[str]:
    code = (
        "import sys, io, contextlib\nfrom epiconsole.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    main({args!r})\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(" + repr(HEAVY) + ")))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def main() -> int:
    bare = best_of([sys.executable, "-c", "pass"])
    help_s = best_of([sys.executable, "-m", "epiconsole", "--help"])
    matrix_s = best_of([sys.executable, "-m", "epiconsole", "matrix", "--json"])
    heavy_help = heavy_modules(["matrix", "--json"])
    ok = help_s <= TARGET_HELP_S and not heavy_help
    print(f"machine: {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"python -c pass            {bare * 1000:7.1f} ms (reference)")
    print(f"epiconsole --help         {help_s * 1000:7.1f} ms  (target <= {TARGET_HELP_S * 1000:.0f} ms)"
          f"  {help_s / bare:.1f}x bare python")
    print(f"epiconsole matrix --json  {matrix_s * 1000:7.1f} ms  heavy modules imported: {heavy_help or 'none'}")
    print(json.dumps({"bench": "startup", "bare_s": bare, "help_s": help_s, "matrix_s": matrix_s,
                      "heavy": heavy_help, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

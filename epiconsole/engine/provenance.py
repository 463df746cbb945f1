"""Software provenance recorded with every campaign and trial (Bluesky records what a run ran with).

Versions come from ``importlib.metadata`` (no heavy imports: lm-eval's version is read from its
distribution metadata, not by importing it), the git sha from the checkout epiconsole runs from (when
it runs from one), and the configuration's digest.
"""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import epiconsole

#: Distributions whose versions matter for a measurement.
PACKAGES = (
    "epiconsole", "numpy", "aiosqlite", "asyncssh", "aiohttp", "pyserial-asyncio-fast", "lm_eval",
    "datasets", "transformers", "torch", "safetensors", "textual",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the checkout epiconsole is imported from, or None outside a git checkout."""
    root = Path(epiconsole.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=5, check=False,
    )
    return sha + ("-dirty" if dirty.stdout.strip() else "")


@functools.lru_cache(maxsize=1)
def _software() -> dict[str, Any]:
    return {
        "epiconsole": epiconsole.__version__,
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
    }


def software() -> dict[str, Any]:
    """epiconsole version and git sha, Python, platform and package versions (computed once per process)."""
    return dict(_software())


def campaign_provenance(cfg: Any) -> dict[str, Any]:
    return {
        "software": software(),
        "config_digest": cfg.digest(),
        "config_source": cfg.source,
        "lab": cfg.lab.name,
        "simulated": cfg.simulated,
        "token_denominator": cfg.thresholds.token_denominator,
    }

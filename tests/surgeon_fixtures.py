"""Shared builders for the surgeon tests: tiny sharded Qwen3-MoE checkpoints and their profiles."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from epiconsole.surgeon.synth import make_profile, make_tiny_checkpoint


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the source-hash cache out of the user's cache dir."""
    monkeypatch.setenv("EPICONSOLE_SURGEON_CACHE", str(tmp_path / "hash-cache.json"))


def build(tmp: Path, name: str = "src", *, seed: int = 0, **kwargs: object) -> tuple[Path, Path]:
    """A checkpoint and a profile file next to it."""
    ck = make_tiny_checkpoint(tmp / name, seed=seed, **kwargs)  # type: ignore[arg-type]
    profile = tmp / f"{name}-profile.json"
    profile.write_text(json.dumps(make_profile(ck, seed)), encoding="utf-8")
    return ck, profile


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (to prove a directory was not modified)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }

"""A cache of source tensor sha256 digests, so repeated surgeries on one source hash it once.

A matrix prunes the same 61 GB source 24 times; hashing it each time would cost more than the copy.
The key is (real path, size, mtime in ns, inode): a source file rewritten in place gets a new mtime
and is hashed again. The cache lives in ``$EPICONSOLE_SURGEON_CACHE`` or the XDG cache dir and is
written atomically, dropping entries whose file is gone or changed; a missing or corrupt cache
only costs a re-hash.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

ENV_VAR = "EPICONSOLE_SURGEON_CACHE"


def cache_path() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("epiconsole")) / "surgeon-source-hashes.json"


def file_key(path: Path) -> str:
    st = path.stat()
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


class HashCache:
    """Digest lookups by :func:`file_key`; ``save`` merges with what other runs wrote meanwhile."""

    def __init__(self, path: Path | None = None, enabled: bool = True) -> None:
        self.path = path or cache_path()
        self.enabled = enabled
        self._entries = self._load() if enabled else {}
        self._new: dict[str, dict[str, str]] = {}

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def get(self, path: Path) -> dict[str, str] | None:
        """Tensor name -> sha256 of its data, for this exact file version, if cached."""
        return self._entries.get(file_key(path)) if self.enabled else None

    def put(self, path: Path, digests: dict[str, str]) -> None:
        if self.enabled:
            key = file_key(path)
            self._entries[key] = digests
            self._new[key] = digests

    def save(self) -> None:
        if not self.enabled or not self._new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {k: v for k, v in {**self._load(), **self._new}.items() if _still_valid(k)}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".hashes-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(merged, f, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError:
            # The cache is an optimisation; failing to write it must not fail a surgery.
            pass


def _still_valid(key: str) -> bool:
    """Whether a cache key still describes a file on disk; stale entries (deleted or rewritten
    sources, the simulated lab's temporary checkpoints) are dropped so the cache stays small."""
    path = key.split("|", 1)[0]
    try:
        return file_key(Path(path)) == key
    except OSError:
        return False

"""Shard digests that a surgery can compute without re-reading the bytes it copied verbatim.

``tree-sha256`` of a shard = sha256 of its header bytes (the 8-byte length and the JSON) followed by
the 32-byte sha256 of each tensor's data, in file order. Tensor digests of a source are computed once
(and cached), so an output shard's digest needs hashing only for the tensors the surgery changed
(sliced routers, zeroed experts); ``validate`` recomputes every digest from the bytes on disk, so a
faulty copy is still caught.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

from epiconsole.errors import UserError
from epiconsole.surgeon.safetensors_io import ShardHeader, read_header

PREFIX = "tree-sha256:"
WINDOW = 16 << 20  # bytes mapped at once: bounds resident memory (one window per worker) whatever the tensor size


def shard_digest(header_bytes: bytes, tensor_digests: Sequence[str]) -> str:
    h = hashlib.sha256(header_bytes)
    for d in tensor_digests:
        h.update(bytes.fromhex(d))
    return PREFIX + h.hexdigest()


def hash_range(fd: int, pos: int, length: int, *hashers: object) -> None:
    """Feed ``length`` bytes at ``pos`` to every hasher, through read-only windows of the page cache."""
    end = pos + length
    while pos < end:
        k = min(end - pos, WINDOW)
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(fd, pos + k - base, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ, offset=base)
        except (OSError, ValueError):
            raise UserError(f"Cannot read bytes {pos}..{pos + k} of a shard; the file is damaged, re-copy it.") from None
        try:
            with memoryview(mm) as whole, whole[pos - base :] as view:
                for h in hashers:
                    h.update(view)  # type: ignore[attr-defined]
        finally:
            mm.close()
        pos += k


def file_digests(path: Path, header: ShardHeader | None = None) -> tuple[str, dict[str, str]]:
    """(tree-sha256 of the shard, sha256 of each tensor) computed from the bytes on disk."""
    header = header or read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, header.header_bytes, 0)
        digests: dict[str, str] = {}
        for t in header.tensors:
            h = hashlib.sha256()
            hash_range(fd, t.begin, t.nbytes, h)
            digests[t.name] = h.hexdigest()
    finally:
        os.close(fd)
    return shard_digest(head, [digests[t.name] for t in header.tensors]), digests

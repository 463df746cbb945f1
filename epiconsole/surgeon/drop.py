"""Expert removal on a safetensors checkpoint, streamed shard by shard as byte-range copies.

Every output shard is the source shard read front to back: each byte is copied, skipped (a removed
expert or router row) or replaced by zeros. Output tensors keep the source order, so the plan is a
list of segments over the source file and nothing is decoded: slicing router rows is a byte-range
copy of whole rows. Memory is one fixed buffer per worker thread, independent of tensor sizes.
The output is written to a hidden sibling directory and renamed into place at the end; any failure
removes it, and the source is opened read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from epiconsole import __version__
from epiconsole.errors import UserError
from epiconsole.surgeon.digest import hash_range, shard_digest
from epiconsole.surgeon.hashcache import HashCache
from epiconsole.surgeon.layout import INDEX_NAME, MANIFEST_NAME, Checkpoint, load_checkpoint
from epiconsole.surgeon.progress import Progress
from epiconsole.surgeon.ranking import load_profile, plan_drops
from epiconsole.surgeon.safetensors_io import OutTensor, encode_header

MANIFEST_FORMAT = "epiconsole-surgery/1"
CHUNK = 16 << 20  # bytes per read/write: large enough that syscall overhead vanishes
_ZEROS = bytes(CHUNK)

Action = Literal["copy", "skip", "zero"]


@dataclass(frozen=True)
class Segment:
    """``length`` source bytes at ``offset``: copied, skipped or written as zeros."""

    action: Action
    offset: int
    length: int
    #: The source tensor these bytes belong to, and whether this segment is its last.
    tensor: str
    ends_tensor: bool = True
    #: The output tensor is the source tensor byte for byte (its digest carries over).
    verbatim: bool = True


@dataclass(frozen=True)
class ShardPlan:
    """How one output shard is produced from one source shard."""

    file: str
    header: bytes
    tensors: tuple[OutTensor, ...]
    segments: tuple[Segment, ...]
    #: The source's own header bytes (8 + N), hashed with the data for the source digest.
    source_header_bytes: int

    @property
    def out_bytes(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class DropResult:
    out: Path
    manifest: Mapping[str, Any]
    noop: bool
    seconds: float
    bytes_written: int = 0


@dataclass
class _Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    tensors_done: int = 0
    bytes_done: int = 0


def _row_runs(rows: int, dropped: Sequence[int]) -> list[tuple[bool, int, int]]:
    """Contiguous runs of (is_dropped, first_row, row_count) covering rows 0..rows-1."""
    drop = set(dropped)
    runs: list[tuple[bool, int, int]] = []
    for r in range(rows):
        d = r in drop
        if runs and runs[-1][0] == d:
            runs[-1] = (d, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((d, r, 1))
    return runs


def build_plans(ck: Checkpoint, drops: Mapping[int, Sequence[int]], strategy: str) -> dict[str, ShardPlan]:
    """Segment plans for every shard, plus renamed/reshaped output tensors."""
    fam = ck.family
    # layer -> {source expert: output expert}; under remove the survivors close ranks in order.
    renumber: dict[int, dict[int, int]] = {}
    for layer, dropped in drops.items():
        gone = set(dropped)
        kept = [j for j in range(ck.moe_layers[layer].num_experts) if j not in gone]
        renumber[layer] = {old: new for new, old in enumerate(kept)}
    router_of: dict[str, int] = {}
    expert_of: dict[str, tuple[int, int, str]] = {}
    for layer, moe in ck.moe_layers.items():
        for name in moe.routers.values():
            router_of[name] = layer
        for j, params in moe.experts.items():
            for param, name in params.items():
                expert_of[name] = (layer, j, param)

    plans: dict[str, ShardPlan] = {}
    for file, shard in ck.shards.items():
        out_tensors: list[OutTensor] = []
        segments: list[Segment] = []
        for t in shard.tensors:
            name, shape = t.name, t.shape
            if name in expert_of and expert_of[name][0] in drops:
                layer, j, param = expert_of[name]
                if j in drops[layer]:
                    if strategy == "remove":
                        segments.append(Segment("skip", t.begin, t.nbytes, t.name))
                        continue
                    action: Action = "zero" if strategy == "zero" else "copy"
                    segments.append(Segment(action, t.begin, t.nbytes, t.name, verbatim=action == "copy"))
                    out_tensors.append(OutTensor(name, t.dtype, shape))
                    continue
                if strategy == "remove":
                    name = fam.expert_name.format(layer=layer, expert=renumber[layer][j], param=param)
                segments.append(Segment("copy", t.begin, t.nbytes, t.name))
            elif name in router_of and router_of[name] in drops and strategy != "mask":
                layer = router_of[name]
                dropped = drops[layer]
                rb = t.row_bytes
                runs = _row_runs(shape[0], dropped)
                for i, (is_dropped, first, count) in enumerate(runs):
                    action = ("skip" if strategy == "remove" else "zero") if is_dropped else "copy"
                    segments.append(Segment(action, t.begin + first * rb, count * rb, t.name, i == len(runs) - 1, verbatim=False))
                if strategy == "remove":
                    shape = (shape[0] - len(dropped), *shape[1:])
            else:
                segments.append(Segment("copy", t.begin, t.nbytes, t.name))
            out_tensors.append(OutTensor(name, t.dtype, shape))
        header = encode_header(out_tensors, shard.metadata)
        plans[file] = ShardPlan(file, header, tuple(out_tensors), tuple(segments), shard.header_bytes)
    return plans


def _write_all(fd: int, data: memoryview | bytes) -> None:
    # Every view is released even when the write fails: a view left in the traceback would keep the
    # source's mmap window exported, and closing it would then raise BufferError over the real error.
    with memoryview(data) as whole:
        done = 0
        while done < len(whole):
            with whole[done:] as rest:
                done += os.write(fd, rest)


def _run_shard(
    src: Path,
    dst: Path,
    plan: ShardPlan,
    known: Mapping[str, str] | None,
    counters: _Counters,
    total_tensors: int,
    progress: Progress,
    stop: threading.Event,
) -> tuple[str, str, dict[str, str]]:
    """Write one output shard; returns (output digest, source digest, source tensor digests).

    With the source's tensor digests ``known`` (cached), verbatim tensors move with
    ``copy_file_range`` (in-kernel, like ``cp``) and only changed tensors are hashed. Without them,
    every source byte is hashed once through read-only page-cache windows and written from there.
    """
    src_digests: dict[str, str] = dict(known or {})
    out_digests: list[str] = []
    sfd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(sfd).st_size
        src_head = os.pread(sfd, plan.source_header_bytes, 0)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(dfd, plan.header)
            src_h: Any = None
            out_h: Any = None
            for seg in plan.segments:
                if stop.is_set():
                    raise _Stopped
                if seg.offset + seg.length > size:
                    raise UserError(f"{src} ended early at byte {size}; re-copy the source shard.")
                need_src = known is None
                if need_src and src_h is None:
                    src_h = hashlib.sha256()
                if not seg.verbatim and seg.action != "skip" and out_h is None:
                    out_h = hashlib.sha256()
                if seg.action == "copy":
                    if need_src or not seg.verbatim:
                        _copy_hashed(sfd, dfd, seg.offset, seg.length, src_h, out_h)
                    else:
                        _copy_range(sfd, dfd, seg.offset, seg.length)
                else:
                    if need_src:
                        hash_range(sfd, seg.offset, seg.length, src_h)
                    if seg.action == "zero":
                        _write_zeros(dfd, seg.length, out_h)
                if seg.ends_tensor:
                    if need_src:
                        src_digests[seg.tensor] = src_h.hexdigest()
                        src_h = None
                    if seg.action != "skip" or out_h is not None:
                        out_digests.append(out_h.hexdigest() if out_h is not None else src_digests[seg.tensor])
                    out_h = None
                with counters.lock:
                    counters.bytes_done += seg.length if seg.action != "skip" else 0
                    if seg.ends_tensor:
                        counters.tensors_done += 1
                    done, nbytes = counters.tensors_done, counters.bytes_done
                if seg.ends_tensor:
                    progress.tensor(done=done, total=total_tensors, bytes=nbytes)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    # Segments walk the source in file order, so their tensor names give the source's tensor order.
    order = [seg.tensor for seg in plan.segments if seg.ends_tensor]
    src_digest = shard_digest(src_head, [src_digests[name] for name in order])
    return shard_digest(plan.header, out_digests), src_digest, src_digests


def _copy_range(sfd: int, dfd: int, pos: int, length: int) -> None:
    """In-kernel copy (no user-space buffer); falls back to mapped writes where unsupported."""
    end = pos + length
    while pos < end:
        try:
            n = os.copy_file_range(sfd, dfd, min(end - pos, 1 << 30), pos)
        except OSError:
            _copy_hashed(sfd, dfd, pos, end - pos, None, None)
            return
        if n == 0:
            raise UserError(f"A source shard ended early at byte {pos}; re-copy it.")
        pos += n


def _copy_hashed(sfd: int, dfd: int, pos: int, length: int, src_h: Any, out_h: Any) -> None:
    """Copy through read-only page-cache windows, feeding the hashers on the way (one copy, like cp)."""

    class _Writer:
        def update(self, view: memoryview) -> None:
            _write_all(dfd, view)

    hash_range(sfd, pos, length, *(h for h in (src_h, out_h) if h is not None), _Writer())


def _write_zeros(dfd: int, length: int, out_h: Any) -> None:
    while length:
        k = min(length, CHUNK)
        _write_all(dfd, _ZEROS[:k])
        if out_h is not None:
            out_h.update(_ZEROS[:k])
        length -= k


class _Stopped(Exception):
    """Another shard failed; this one stops early (its partial file goes with the temp dir)."""


def _request(ck: Checkpoint, experts: int, layers: str, strategy: str, profile_sha: str) -> dict[str, Any]:
    return {
        "source": str(ck.path.resolve()),
        "experts": experts,
        "layers": layers,
        "strategy": strategy,
        "profile_sha256": profile_sha,
    }


def _fingerprint(ck: Checkpoint) -> list[dict[str, Any]]:
    out = []
    for file in ck.shards:
        st = (ck.path / file).stat()
        out.append({"file": file, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _existing_is_same(out: Path, request: Mapping[str, Any], fingerprint: list[dict[str, Any]]) -> bool:
    """True when ``out`` already holds this exact surgery (same request, same source files, intact sizes)."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(
            f"{out} already exists and is not a surgery output; choose another --out or delete it."
        ) from None
    if manifest.get("request") == dict(request) and manifest.get("source_fingerprint") != fingerprint:
        raise UserError(
            f"{out} holds this surgery made from an earlier version of the source shards (their sizes or "
            f"times changed); delete {out} and run again, or choose another --out."
        )
    if manifest.get("request") != dict(request):
        raise UserError(
            f"{out} already holds a different surgery ({manifest.get('request', {}).get('strategy')}, "
            f"{manifest.get('request', {}).get('experts')} experts, layers "
            f"{manifest.get('request', {}).get('layers')}); choose another --out or delete it."
        )
    for shard in manifest.get("output_shards", []):
        p = out / shard["file"]
        if not p.exists() or p.stat().st_size != shard["bytes"]:
            raise UserError(f"{out} holds this surgery but {shard['file']} is damaged; delete {out} and run again.")
    return True


def drop_experts(
    source: Path | str,
    *,
    experts: int,
    layers: str,
    strategy: str,
    profile: Path | str,
    out: Path | str,
    progress: Progress | None = None,
    workers: int | None = None,
    hash_cache: HashCache | None = None,
) -> DropResult:
    """Drop the ``experts`` least-routed experts per targeted layer; see the module docstring."""
    t0 = time.perf_counter()
    progress = progress or Progress(json_mode=False)
    src = Path(source)
    dst = Path(out)
    ck = load_checkpoint(src)
    prof = load_profile(profile)
    counts = {layer: moe.num_experts for layer, moe in ck.moe_layers.items()}
    drops = plan_drops(prof, moe_layers=counts, top_k=ck.top_k, experts=experts, target=layers, strategy=strategy)
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real == src_real or src_real in dst_real.parents:
        raise UserError(f"--out {dst} is inside the source checkpoint; choose a directory outside {src}.")
    request = _request(ck, experts, layers, strategy, prof.sha256)
    fingerprint = _fingerprint(ck)
    if _occupied(dst) and _existing_is_same(dst, request, fingerprint):
        manifest = json.loads((dst / MANIFEST_NAME).read_text(encoding="utf-8"))
        progress.emit("done", out=str(dst), manifest=str(dst / MANIFEST_NAME), noop=True)
        return DropResult(dst, manifest, True, time.perf_counter() - t0)
    if not dst.parent.is_dir():
        raise UserError(f"The parent of --out ({dst.parent}) does not exist; create it first.")

    plans = build_plans(ck, drops, strategy)
    total_tensors = sum(sum(1 for s in p.segments if s.ends_tensor) for p in plans.values())
    total_out = sum(p.out_bytes for p in plans.values())
    free = shutil.disk_usage(dst.parent).free
    if total_out > free:
        raise UserError(
            f"The output needs {total_out / 1e9:.1f} GB but {dst.parent} has {free / 1e9:.1f} GB free; free space "
            "or choose another --out."
        )
    progress.emit(
        "start",
        source=str(src),
        out=str(dst),
        strategy=strategy,
        layers=layers,
        experts=experts,
        shards=len(plans),
        tensors=total_tensors,
        bytes=total_out,
    )
    cache = hash_cache or HashCache()
    _remove_stale_temps(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        shard_results = _run_all(ck, plans, tmp, cache, progress, total_tensors, workers)
        _write_config(ck, tmp, drops, strategy)
        out_map = _write_index(ck, tmp, plans)
        _copy_others(ck, tmp)
        manifest = _manifest(ck, request, fingerprint, prof, drops, strategy, plans, shard_results, out_map)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        cache.save()
        try:
            os.rename(tmp, dst)  # atomic; replaces an empty directory the user may have created
        except OSError:
            if not _occupied(dst):
                raise
            _existing_is_same(dst, request, fingerprint)  # another run finished this surgery meanwhile
            shutil.rmtree(tmp)
    except OSError as exc:
        # The disk filled up, a quota or file-size limit hit, the source could not be read: the user's to fix.
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"Writing {dst} failed ({exc.strerror or exc}); check free space, quotas and permissions under "
            f"{dst.parent} and that the source is readable, then run again."
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    progress.emit("done", out=str(dst), manifest=str(dst / MANIFEST_NAME), noop=False, seconds=round(seconds, 3))
    return DropResult(dst, manifest, False, seconds, total_out)


def _occupied(dst: Path) -> bool:
    """An existing --out counts only when it holds something (an empty directory is free to use)."""
    return dst.exists() and (not dst.is_dir() or any(dst.iterdir()))


def _remove_stale_temps(dst: Path) -> None:
    """Delete temp dirs of earlier runs for this --out whose process is gone (killed, power loss)."""
    for tmp in dst.parent.glob(f".{dst.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's process: leave it
        else:
            if int(pid) == os.getpid():
                shutil.rmtree(tmp, ignore_errors=True)


def _run_all(
    ck: Checkpoint,
    plans: Mapping[str, ShardPlan],
    tmp: Path,
    cache: HashCache,
    progress: Progress,
    total_tensors: int,
    workers: int | None,
) -> dict[str, tuple[str, str]]:
    """Write every shard, several at once (file I/O and sha256 release the GIL)."""
    counters = _Counters()
    stop = threading.Event()
    known: dict[str, dict[str, str] | None] = {}
    for file in plans:
        cached = cache.get(ck.path / file)
        # A cache entry must name exactly this shard's tensors to be trusted.
        names = {t.name for t in ck.shards[file].tensors}
        known[file] = cached if isinstance(cached, dict) and set(cached) == names else None
    n = workers or min(len(plans), os.cpu_count() or 1, 8)
    done_shards = 0
    lock = threading.Lock()

    def one(file: str) -> tuple[str, tuple[str, str]]:
        nonlocal done_shards
        try:
            out_digest, src_digest, tensor_digests = _run_shard(
                ck.path / file, tmp / file, plans[file], known[file], counters, total_tensors, progress, stop
            )
        except BaseException:
            stop.set()
            raise
        if known[file] is None:
            cache.put(ck.path / file, tensor_digests)
        with lock:
            done_shards += 1
            index = done_shards
        progress.tensor(force=True, done=counters.tensors_done, total=total_tensors, bytes=counters.bytes_done)
        progress.emit("shard", file=file, index=index, total=len(plans), bytes=plans[file].out_bytes, digest=out_digest)
        return file, (out_digest, src_digest)

    results: dict[str, tuple[str, str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="surgeon-shard") as pool:
        futures = [pool.submit(one, file) for file in plans]
        try:
            # The first failure (or an interrupt while waiting) stops every other shard at its
            # next segment; the pool's exit then waits only for those short remainders.
            for fut in as_completed(futures):
                file, digests = fut.result()
                results[file] = digests
        except BaseException as exc:
            stop.set()
            for fut in futures:
                fut.cancel()
            if isinstance(exc, _Stopped):
                # A shard that stopped because another failed can finish first: report that failure.
                wait(futures)
                for fut in futures:
                    first = None if fut.cancelled() else fut.exception()
                    if first is not None and not isinstance(first, _Stopped):
                        raise first from None
            raise
    return results


def _write_config(ck: Checkpoint, tmp: Path, drops: Mapping[int, Sequence[int]], strategy: str) -> None:
    config = dict(ck.config)
    if strategy == "remove":
        sizes = {ck.moe_layers[layer].num_experts - len(d) for layer, d in drops.items()}
        (config[ck.family.num_experts_key],) = sizes  # uniform by construction: one value
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_index(ck: Checkpoint, tmp: Path, plans: Mapping[str, ShardPlan]) -> dict[str, str]:
    weight_map = {t.name: file for file, plan in plans.items() for t in plan.tensors}
    if ck.index is not None:
        index = dict(ck.index)
        metadata = dict(index.get("metadata") or {})
        metadata["total_size"] = sum(t.nbytes for plan in plans.values() for t in plan.tensors)
        index["metadata"] = metadata
        index["weight_map"] = dict(sorted(weight_map.items()))
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return weight_map


def _copy_others(ck: Checkpoint, tmp: Path) -> None:
    """Tokenizer, generation config, licence...: everything that is not weights, config or index."""
    for name in ck.other_files:
        src = ck.path / name
        if src.is_dir():
            shutil.copytree(src, tmp / name, symlinks=True)
        else:
            shutil.copy2(src, tmp / name, follow_symlinks=True)


def _manifest(
    ck: Checkpoint,
    request: Mapping[str, Any],
    fingerprint: list[dict[str, Any]],
    prof: Any,
    drops: Mapping[int, Sequence[int]],
    strategy: str,
    plans: Mapping[str, ShardPlan],
    shard_results: Mapping[str, tuple[str, str]],
    weight_map: Mapping[str, str],
) -> dict[str, Any]:
    before = {str(layer): moe.num_experts for layer, moe in ck.moe_layers.items()}
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "tool": f"epiconsole {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "request": dict(request),
        "source_fingerprint": fingerprint,
        "family": ck.family.name,
        "strategy": strategy,
        "profile": {"sha256": prof.sha256, "model": prof.model, "tokens": prof.tokens, "source": prof.source},
        "num_experts_before": ck.num_experts,
        "num_experts_after": ck.num_experts - (len(next(iter(drops.values()))) if strategy == "remove" else 0),
        "experts_per_layer_before": before,
        # Expert indices are in the source's numbering.
        "dropped": {str(layer): list(d) for layer, d in sorted(drops.items())},
        "source_shards": [
            {"file": f, "bytes": (ck.path / f).stat().st_size, "digest": shard_results[f][1]} for f in plans
        ],
        "output_shards": [
            {"file": f, "bytes": plans[f].out_bytes, "digest": shard_results[f][0]} for f in plans
        ],
        "tensors": len(weight_map),
    }
    if strategy == "remove":
        # Output expert i of a layer is source expert kept[layer][i].
        manifest["kept"] = {
            str(layer): [j for j in range(ck.moe_layers[layer].num_experts) if j not in set(d)]
            for layer, d in sorted(drops.items())
        }
    if strategy == "mask":
        # The runtime must add -inf to these router logits (output numbering = source numbering).
        manifest["masked"] = manifest["dropped"]
    if ck.manifest is not None:
        manifest["previous"] = ck.manifest
    return manifest

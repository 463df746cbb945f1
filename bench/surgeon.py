"""Surgeon benchmark: ``epiconsole surgeon drop`` vs ``cp`` of the same shards, and its peak memory.

Builds a synthetic Qwen3-MoE-layout checkpoint of about ``--size-gb`` GB (bf16, random bytes: the
copy does not look at values), then, in the same run and interleaved so both see the same page-cache
state, times ``cp`` of the shards and the real ``epiconsole surgeon drop`` command (a subprocess, as
the DGX runs it) for ``remove`` (drops 1/8 of the experts) and ``mask`` (copies every byte, like cp).
Peak RSS comes from ``wait4`` of the drop process.

Targets (DESIGN.md §6 / issue 7): drop speed >= 0.8x cp's; peak RSS <= 1.5x the largest tensor + 100 MB.

    .venv/bin/python bench/surgeon.py [--size-gb 1.2] [--reps 3] [--dir DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from epiconsole.surgeon.layout import INDEX_NAME
from epiconsole.surgeon.safetensors_io import OutTensor, encode_header
from epiconsole.surgeon.synth import make_profile


def build_checkpoint(root: Path, size_gb: float, shards: int = 4) -> int:
    """Write the checkpoint; returns the largest tensor's size in bytes."""
    hidden, inter, experts, vocab = 1024, 512, 64, 4096
    per_layer = experts * 3 * inter * hidden * 2 + experts * hidden * 2 + 4 * hidden * hidden * 2
    layers = max(4, round(size_gb * 1e9 / per_layer))
    tensors: list[OutTensor] = [OutTensor("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors += [OutTensor(f"{p}.input_layernorm.weight", "BF16", (hidden,))]
        tensors += [OutTensor(f"{p}.self_attn.{n}_proj.weight", "BF16", (hidden, hidden)) for n in "qkvo"]
        tensors += [OutTensor(f"{p}.post_attention_layernorm.weight", "BF16", (hidden,))]
        tensors += [OutTensor(f"{p}.mlp.gate.weight", "BF16", (experts, hidden))]
        for j in range(experts):
            e = f"{p}.mlp.experts.{j}"
            tensors += [
                OutTensor(f"{e}.gate_proj.weight", "BF16", (inter, hidden)),
                OutTensor(f"{e}.up_proj.weight", "BF16", (inter, hidden)),
                OutTensor(f"{e}.down_proj.weight", "BF16", (hidden, inter)),
            ]
    tensors += [OutTensor("model.norm.weight", "BF16", (hidden,)), OutTensor("lm_head.weight", "BF16", (vocab, hidden))]
    total = sum(t.nbytes for t in tensors)
    noise = np.random.default_rng(0).integers(0, 2**16, size=(16 << 20) // 2, dtype=np.uint16).tobytes()
    groups: list[list[OutTensor]] = [[] for _ in range(shards)]
    acc = 0
    for t in tensors:
        groups[min(shards - 1, acc * shards // total)].append(t)
        acc += t.nbytes
    weight_map = {}
    for s, group in enumerate(groups):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with open(root / name, "wb") as f:
            f.write(encode_header(group, {"format": "pt"}))
            for t in group:
                left = t.nbytes
                while left:
                    k = min(left, len(noise))
                    f.write(noise[:k])
                    left -= k
        weight_map.update({t.name: name for t in group})
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
        "moe_intermediate_size": inter, "num_hidden_layers": layers, "num_experts": experts,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": vocab,
    }
    (root / "config.json").write_text(json.dumps(config))
    return max(t.nbytes for t in tensors)


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed with exit code {proc.returncode}")
    return seconds, usage.ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed after)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="surgeon-bench-", dir=args.dir))
    try:
        src = work / "src"
        src.mkdir()
        largest = build_checkpoint(src, args.size_gb)
        shards = sorted(src.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        (work / "profile.json").write_text(json.dumps(make_profile(src, 0, tokens=1024)))
        env = {**os.environ, "EPICONSOLE_SURGEON_CACHE": str(work / "hash-cache.json")}
        os.environ.update(env)
        drop = [sys.executable, "-m", "epiconsole", "surgeon", "drop", str(src), "--experts", "8",
                "--profile", str(work / "profile.json")]

        def run_cp(i: int) -> float:
            dst = work / f"cp{i}"
            dst.mkdir()
            seconds, _ = timed(["cp", *map(str, shards), str(dst)])
            shutil.rmtree(dst)
            return seconds

        def run_drop(strategy: str, i: int) -> tuple[float, int]:
            out = work / f"{strategy}{i}"
            result = timed([*drop, "--strategy", strategy, "--out", str(out)])
            shutil.rmtree(out)
            return result

        run_cp(-1)  # warm the page cache so every timed run starts from the same state
        cold, cold_rss = run_drop("remove", -1)  # the first drop also hashes the source (then cached)
        cp_t, remove_t, mask_t, rss = [], [], [], [cold_rss]
        for i in range(args.reps):
            cp_t.append(run_cp(i))
            t, r = run_drop("remove", i)
            remove_t.append(t)
            rss.append(r)
            t, r = run_drop("mask", i)
            mask_t.append(t)
            rss.append(r)
        out = work / "noop"
        timed([*drop, "--strategy", "remove", "--out", str(out)])
        noop, _ = timed([*drop, "--strategy", "remove", "--out", str(out)])
        med = statistics.median
        rss_target = 1.5 * largest + 100e6
        figures = {
            "checkpoint_bytes": size,
            "largest_tensor_bytes": largest,
            "cp_s": med(cp_t),
            "drop_remove_s": med(remove_t),
            "drop_mask_s": med(mask_t),
            "drop_remove_first_s_hashing_source": cold,
            "drop_noop_s": noop,
            "speed_vs_cp_remove": med(cp_t) / med(remove_t),
            "speed_vs_cp_mask": med(cp_t) / med(mask_t),
            "peak_rss_bytes": max(rss),
            "rss_target_bytes": rss_target,
            "cpus": os.cpu_count(),
        }
        print(f"checkpoint {size / 1e9:.2f} GB in {len(shards)} shards, largest tensor {largest / 1e6:.1f} MB, {os.cpu_count()} CPUs")
        print("| measure | value | target |\n|---|---|---|")
        print(f"| cp of the shards (median of {args.reps}) | {med(cp_t):.2f} s ({size / med(cp_t) / 1e9:.2f} GB/s) | |")
        print(f"| drop remove 8/64 experts, all layers | {med(remove_t):.2f} s = {figures['speed_vs_cp_remove']:.2f}x cp | >= 0.8x |")
        print(f"| drop mask (every byte copied) | {med(mask_t):.2f} s = {figures['speed_vs_cp_mask']:.2f}x cp | >= 0.8x |")
        print(f"| first drop, hashing the source too | {cold:.2f} s | |")
        print(f"| re-run with the same arguments (no-op) | {noop:.2f} s | |")
        print(f"| peak RSS of drop | {max(rss) / 1e6:.0f} MB | <= {rss_target / 1e6:.0f} MB |")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        ok = figures["speed_vs_cp_remove"] >= 0.8 and max(rss) <= rss_target
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

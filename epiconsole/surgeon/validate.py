"""Checks on a surgery output: structure without torch, then (optionally) a generation with transformers.

Structural checks read headers, the config, the index and the manifest, recompute every shard's
tree-sha256 digest (see digest.py) against the manifest and scan the tensors the surgery touched (routers, zeroed experts) for NaN/Inf with numpy.
The generation check loads the model with transformers, applies the manifest's run-time mask if any,
and generates a few tokens; it is skipped (and says so) when torch/transformers are not installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epiconsole.errors import UserError
from epiconsole.surgeon.digest import file_digests
from epiconsole.surgeon.layout import Checkpoint, load_checkpoint
from epiconsole.surgeon.progress import Progress
from epiconsole.surgeon.safetensors_io import count_nonfinite, read_array


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""
    skipped: bool = False


def structural_checks(ck: Checkpoint, *, hashes: bool = True) -> list[Check]:
    """Every torch-free check; a failed check says what is wrong in its detail."""
    checks: list[Check] = []
    cfg = ck.config
    E = ck.num_experts
    counts = {layer: moe.num_experts for layer, moe in ck.moe_layers.items()}
    bad = {layer: n for layer, n in counts.items() if n != E}
    checks.append(
        Check(
            "expert count",
            not bad,
            f"config says {E} experts; layer {min(bad)} has {bad[min(bad)]}" if bad else f"{len(counts)} MoE layers x {E} experts",
        )
    )
    n_layers = cfg.get("num_hidden_layers")
    sparse = [i for i in range(n_layers or 0) if _is_moe_layer(cfg, i)] if isinstance(n_layers, int) else []
    checks.append(
        Check(
            "MoE layers",
            not sparse or sorted(counts) == sparse,
            "" if not sparse or sorted(counts) == sparse else f"config expects MoE layers {sparse}, found {sorted(counts)}",
        )
    )
    checks.append(_shape_check(ck))
    if ck.index is not None:
        declared = (ck.index.get("metadata") or {}).get("total_size")
        checks.append(
            Check(
                "index total_size",
                declared == ck.data_bytes,
                f"{ck.data_bytes} bytes of tensors" if declared == ck.data_bytes else f"index says {declared}, tensors hold {ck.data_bytes}",
            )
        )
    checks.append(Check("index and shards agree", True, f"{len(ck.tensors)} tensors in {len(ck.shards)} shards"))
    if ck.manifest is not None:
        checks.extend(_manifest_checks(ck, hashes=hashes))
    checks.append(_finite_check(ck))
    return checks


def _is_moe_layer(cfg: Mapping[str, Any], i: int) -> bool:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    return i not in (cfg.get("mlp_only_layers") or []) and (i + 1) % step == 0


def _shape_check(ck: Checkpoint) -> Check:
    hidden = ck.config.get("hidden_size")
    reference: dict[str, tuple[int, ...]] = {}
    for layer, moe in sorted(ck.moe_layers.items()):
        router = ck.info(moe.routers["weight"])
        if router.shape != (moe.num_experts, hidden):
            return Check("shapes", False, f"layer {layer} router is {list(router.shape)}, expected [{moe.num_experts}, {hidden}]")
        for j, params in moe.experts.items():
            for param, name in params.items():
                shape = ck.info(name).shape
                if reference.setdefault(param, shape) != shape:
                    return Check("shapes", False, f"layer {layer} expert {j} {param} is {list(shape)}, others are {list(reference[param])}")
    return Check("shapes", True, ", ".join(f"{p} {list(s)}" for p, s in sorted(reference.items())))


def _touched(ck: Checkpoint) -> tuple[list[str], list[str]]:
    """(tensors to scan for NaN/Inf, tensors that must be all zeros)."""
    scan = [moe.routers[s] for moe in ck.moe_layers.values() for s in moe.routers]
    zeros: list[str] = []
    manifest = ck.manifest or {}
    if manifest.get("strategy") == "zero":
        for key, dropped in (manifest.get("dropped") or {}).items():
            moe = ck.moe_layers.get(int(key))
            if moe is None:
                continue
            for j in dropped:
                if j in moe.experts:
                    zeros.extend(moe.experts[j].values())
    return scan + zeros, zeros


def _finite_check(ck: Checkpoint) -> Check:
    scan, _ = _touched(ck)
    for name in scan:
        shard, info = ck.tensors[name]
        n = count_nonfinite(read_array(ck.path / shard, info), info.dtype)
        if n:
            return Check("finite values", False, f"{name} holds {n} NaN/Inf values")
    return Check("finite values", True, f"{len(scan)} touched tensors scanned")


def _manifest_checks(ck: Checkpoint, *, hashes: bool) -> list[Check]:
    import numpy as np

    m = ck.manifest or {}
    checks: list[Check] = []
    strategy = m.get("strategy")
    dropped = {int(k): list(v) for k, v in (m.get("dropped") or {}).items()}
    listed = {s["file"]: s for s in m.get("output_shards", [])}
    files_ok = set(listed) == set(ck.shards)
    checks.append(
        Check("manifest shards", files_ok, "" if files_ok else f"manifest lists {sorted(listed)}, directory has {sorted(ck.shards)}")
    )
    if files_ok:
        for file, entry in listed.items():
            size = (ck.path / file).stat().st_size
            if size != entry.get("bytes"):
                checks.append(Check("manifest shard sizes", False, f"{file} has {size} bytes, manifest says {entry.get('bytes')}"))
                break
        else:
            checks.append(Check("manifest shard sizes", True))
        if hashes:
            for file, entry in listed.items():
                digest, _ = file_digests(ck.path / file, ck.shards[file])
                if digest != entry.get("digest"):
                    checks.append(Check("manifest shard hashes", False, f"{file} digest differs from the manifest"))
                    break
            else:
                checks.append(Check("manifest shard hashes", True, f"{len(listed)} shards"))
        else:
            checks.append(Check("manifest shard hashes", True, "skipped (--quick)", skipped=True))
    if strategy == "remove":
        after = m.get("num_experts_after")
        ok = after == ck.num_experts and all(moe.num_experts == after for moe in ck.moe_layers.values())
        checks.append(Check("manifest: experts removed", ok, f"{m.get('num_experts_before')} -> {after} experts per layer"))
    elif strategy == "mask":
        masked = {int(k): v for k, v in (m.get("masked") or {}).items()}
        problems = [
            layer
            for layer, experts in masked.items()
            if layer not in ck.moe_layers
            or any(not 0 <= j < ck.moe_layers[layer].num_experts for j in experts)
            or ck.moe_layers[layer].num_experts - len(set(experts)) < ck.top_k
        ]
        checks.append(
            Check(
                "manifest: masked experts",
                not problems and masked == dropped,
                f"layer {problems[0]} masks experts that do not exist or leaves fewer than top-k" if problems else f"{sum(map(len, masked.values()))} experts masked in {len(masked)} layers",
            )
        )
    elif strategy == "zero":
        _, zeros = _touched(ck)
        nonzero = next((n for n in zeros if np.any(read_array(ck.path / ck.tensors[n][0], ck.info(n)))), None)
        rows_bad = None
        for layer, experts in dropped.items():
            moe = ck.moe_layers.get(layer)
            if moe is None:
                rows_bad = layer
                break
            router = read_array(ck.path / ck.tensors[moe.routers["weight"]][0], ck.info(moe.routers["weight"]))
            if np.any(router[experts]):
                rows_bad = layer
                break
        ok = nonzero is None and rows_bad is None
        detail = (
            f"{nonzero} should be zero" if nonzero else f"layer {rows_bad} router rows should be zero" if rows_bad is not None else f"{len(zeros)} expert tensors and their router rows are zero"
        )
        checks.append(Check("manifest: experts zeroed", ok, detail))
    elif strategy is not None:
        checks.append(Check("manifest strategy", False, f"unknown strategy {strategy!r}"))
    return checks


def generation_check(ck: Checkpoint, *, new_tokens: int = 4, device: str = "auto") -> Check:
    """Load the model with transformers (mask applied), check finite logits and generate a few tokens."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        return Check("generation", True, "skipped: torch/transformers not installed", skipped=True)
    from epiconsole.surgeon.runtime import install_router_mask, masked_from_manifest
    from epiconsole.surgeon.runtime import quiet_transformers as _quiet_transformers

    _quiet_transformers()
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=dtype, output_loading_info=True)
    except Exception as exc:  # any load failure is the finding this check exists to report
        return Check("generation", False, f"transformers cannot load the model: {type(exc).__name__}: {exc}")
    # transformers fills missing weights with random values and only warns: that is a failure here.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or []))
        if keys:
            return Check("generation", False, f"transformers reports {kind.replace('_', ' ')}: {', '.join(keys[:3])}")
    model = model.to(dev).eval()
    install_router_mask(model, masked_from_manifest(ck.manifest or {}))
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ck.path))
        ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    except (OSError, ValueError, TypeError):
        ids = torch.arange(1, 9, dtype=torch.long).unsqueeze(0) % int(ck.config.get("vocab_size", 8))
    ids = ids.to(dev)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            return Check("generation", False, "the forward pass produced NaN/Inf logits")
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    gen = out[0, ids.shape[1] :].tolist()
    if len(gen) != new_tokens:
        return Check("generation", False, f"generated {len(gen)} tokens instead of {new_tokens}")
    text = tokenizer.decode(gen) if tokenizer is not None else str(gen)
    return Check("generation", True, f"{new_tokens} tokens on {dev}: {text!r}")


def validate_checkpoint(
    path: Path | str,
    *,
    generate: bool = True,
    hashes: bool = True,
    progress: Progress | None = None,
) -> list[Check]:
    """Run every check, emitting one ``check`` event each; returns the checks."""
    progress = progress or Progress()
    root = Path(path)
    progress.emit("start", out=str(root))
    try:
        ck = load_checkpoint(root)
    except UserError as exc:
        check = Check("checkpoint loads", False, str(exc))
        progress.emit("check", name=check.name, ok=False, detail=check.detail)
        return [check]
    checks = [Check("checkpoint loads", True, f"{ck.family.name}, {len(ck.shards)} shards")]
    checks.extend(structural_checks(ck, hashes=hashes))
    for c in checks:
        progress.emit("check", name=c.name, ok=c.ok, detail=c.detail, skipped=c.skipped)
    # Generation only makes sense on a structurally sound checkpoint; it is the slow part.
    if generate and all(c.ok for c in checks):
        c = generation_check(ck)
        checks.append(c)
        progress.emit("check", name=c.name, ok=c.ok, detail=c.detail, skipped=c.skipped)
    return checks

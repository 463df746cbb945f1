"""``surgeon inspect``: what a checkpoint is, read from its config, index and shard headers only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from epiconsole.surgeon.layout import load_checkpoint


def inspect_checkpoint(path: Path | str) -> dict[str, Any]:
    """A JSON-ready summary: architecture, layers, experts per layer, top-k, routers, shards, dtypes, surgery."""
    ck = load_checkpoint(path)
    cfg = ck.config
    dtypes = Counter()
    for _, info in ck.tensors.values():
        dtypes[info.dtype] += info.nbytes
    experts_per_layer = {str(layer): moe.num_experts for layer, moe in sorted(ck.moe_layers.items())}
    router_shapes = sorted({tuple(ck.info(moe.routers["weight"]).shape) for moe in ck.moe_layers.values()})
    summary: dict[str, Any] = {
        "path": str(ck.path),
        "family": ck.family.name,
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures", []),
        "layers": ck.num_layers,
        "moe_layers": len(ck.moe_layers),
        "hidden_size": cfg.get("hidden_size"),
        "num_experts": ck.num_experts,
        "experts_per_layer": experts_per_layer,
        "uniform": len(set(experts_per_layer.values())) == 1,
        "top_k": ck.top_k,
        "norm_topk_prob": cfg.get("norm_topk_prob"),
        "router_shapes": [list(s) for s in router_shapes],
        "router_bias": any("bias" in moe.routers for moe in ck.moe_layers.values()),
        "expert_params": sorted(next(iter(ck.moe_layers.values())).experts[0]) if ck.moe_layers else [],
        "tensors": len(ck.tensors),
        "bytes": ck.data_bytes,
        "dtypes": dict(sorted(dtypes.items())),
        "shards": [
            {"file": f, "bytes": h.size, "tensors": len(h.tensors)} for f, h in ck.shards.items()
        ],
        "other_files": list(ck.other_files),
        "surgery": None,
    }
    if ck.manifest is not None:
        m = ck.manifest
        summary["surgery"] = {
            "strategy": m.get("strategy"),
            "experts": (m.get("request") or {}).get("experts"),
            "layers": (m.get("request") or {}).get("layers"),
            "dropped": m.get("dropped"),
            "source": (m.get("request") or {}).get("source"),
            "profile_sha256": (m.get("profile") or {}).get("sha256"),
            "created": m.get("created"),
            "previous": m.get("previous") is not None,
        }
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect_checkpoint`'s summary."""
    per_layer = set(s["experts_per_layer"].values())
    experts = f"{s['num_experts']} per layer" if len(per_layer) == 1 else f"per layer {s['experts_per_layer']}"
    lines = [
        f"{s['path']}",
        f"  architecture  {s['model_type']} ({', '.join(s['architectures']) or '?'}), family {s['family']}",
        f"  layers        {s['layers']} ({s['moe_layers']} MoE), hidden {s['hidden_size']}",
        f"  experts       {experts}, top-{s['top_k']}, norm_topk_prob={s['norm_topk_prob']}",
        f"  routers       {', '.join(str(r) for r in s['router_shapes'])}{' + bias' if s['router_bias'] else ''}",
        f"  expert params {', '.join(s['expert_params'])}",
        f"  tensors       {s['tensors']}, {_size(s['bytes'])}, dtypes "
        + ", ".join(f"{d} {_size(b)}" for d, b in s["dtypes"].items()),
        f"  shards        {len(s['shards'])}: " + ", ".join(sh["file"] for sh in s["shards"][:4])
        + (" ..." if len(s["shards"]) > 4 else ""),
    ]
    sur = s["surgery"]
    if sur is None:
        lines.append("  surgery       none (no epi-surgery.json)")
    else:
        lines.append(
            f"  surgery       {sur['strategy']}: {sur['experts']} experts in {sur['layers']} layers, "
            f"from {sur['source']} ({sur['created']})" + (", on top of an earlier surgery" if sur["previous"] else "")
        )
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"

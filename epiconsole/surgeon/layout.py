"""A Mixture-of-Experts checkpoint on disk: config, index, shard headers and where the experts are.

Which tensors are routers and experts is data, not code: :data:`FAMILIES` holds one row per model
family (Qwen3-MoE / Qwen2-MoE, Mixtral) with its key patterns and config keys. Loading checks the
structure the surgeon relies on (every index entry exists, every MoE layer has experts 0..E-1 with
the same parameters, router rows match the expert count) and says in one sentence what is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epiconsole.errors import UserError
from epiconsole.surgeon.safetensors_io import ShardHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MANIFEST_NAME = "epi-surgery.json"


@dataclass(frozen=True)
class Family:
    """Key patterns and config keys of one MoE model family."""

    name: str
    model_types: tuple[str, ...]
    #: Matches a router tensor; groups: layer, suffix ("weight" or "bias").
    router: re.Pattern[str]
    #: Matches an expert tensor; groups: layer, expert, parameter (e.g. "gate_proj.weight").
    expert: re.Pattern[str]
    #: Templates that rebuild names from (layer, expert, param) / (layer, suffix).
    expert_name: str
    router_name: str
    num_experts_key: str
    top_k_key: str = "num_experts_per_tok"


FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen3_moe",
        model_types=("qwen3_moe", "qwen2_moe"),
        router=re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.(weight|bias)$"),
        expert=re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$"),
        expert_name="model.layers.{layer}.mlp.experts.{expert}.{param}",
        router_name="model.layers.{layer}.mlp.gate.{suffix}",
        num_experts_key="num_experts",
    ),
    Family(
        name="mixtral",
        model_types=("mixtral",),
        router=re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.(weight|bias)$"),
        expert=re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(.+)$"),
        expert_name="model.layers.{layer}.block_sparse_moe.experts.{expert}.{param}",
        router_name="model.layers.{layer}.block_sparse_moe.gate.{suffix}",
        num_experts_key="num_local_experts",
    ),
)


@dataclass(frozen=True)
class MoELayer:
    """The router and expert tensors of one MoE layer."""

    layer: int
    #: suffix ("weight"/"bias") -> tensor name.
    routers: Mapping[str, str]
    #: expert index -> parameter -> tensor name.
    experts: Mapping[int, Mapping[str, str]]

    @property
    def num_experts(self) -> int:
        return len(self.experts)


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors checkpoint directory, parsed from its headers (no tensor data is read)."""

    path: Path
    config: Mapping[str, Any]
    family: Family
    #: Shard file name -> parsed header, in file-name order.
    shards: Mapping[str, ShardHeader]
    #: Tensor name -> (shard file name, info).
    tensors: Mapping[str, tuple[str, TensorInfo]]
    moe_layers: Mapping[int, MoELayer]
    #: The index file's JSON, or None for a single ``model.safetensors``.
    index: Mapping[str, Any] | None
    #: Our surgery manifest, when this checkpoint is itself a surgery output.
    manifest: Mapping[str, Any] | None = None
    other_files: tuple[str, ...] = field(default=())

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", len(self.moe_layers)))

    @property
    def num_experts(self) -> int:
        return int(self.config[self.family.num_experts_key])

    @property
    def top_k(self) -> int:
        return int(self.config[self.family.top_k_key])

    @property
    def data_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {what}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); fix or re-download it.") from None


def detect_family(config: Mapping[str, Any], names: list[str]) -> Family:
    """The family by ``model_type``, else by which key patterns the tensor names match."""
    model_type = str(config.get("model_type", ""))
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    for fam in FAMILIES:
        if any(fam.router.match(n) for n in names):
            return fam
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UserError(
        f"model_type {model_type!r} is not a Mixture-of-Experts family the surgeon knows ({known})."
    )


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Parse a checkpoint directory; any inconsistency raises :class:`UserError` with one sentence."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass the checkpoint directory (the one with config.json).")
    config = _read_json(root / "config.json", "a Hugging Face checkpoint directory needs its config.json")
    index_path = root / INDEX_NAME
    index: dict[str, Any] | None = None
    if index_path.exists():
        index = _read_json(index_path, "")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has no weight_map; re-download the index file.")
        shard_names = sorted(set(weight_map.values()))
    elif (root / SINGLE_NAME).exists():
        weight_map = None
        shard_names = [SINGLE_NAME]
    else:
        raise UserError(f"{root} holds neither {INDEX_NAME} nor {SINGLE_NAME}; is it a safetensors checkpoint?")

    shards: dict[str, ShardHeader] = {}
    tensors: dict[str, tuple[str, TensorInfo]] = {}
    for shard in shard_names:
        shard_path = root / shard
        if "/" in shard or shard.startswith("."):
            raise UserError(f"{index_path} names shard {shard!r} outside the checkpoint directory.")
        if not shard_path.exists():
            raise UserError(f"{shard_path} is missing but the index names it; re-download the checkpoint.")
        header = read_header(shard_path)
        shards[shard] = header
        for info in header.tensors:
            if info.name in tensors:
                raise UserError(f"Tensor {info.name!r} is stored twice ({tensors[info.name][0]} and {shard}).")
            tensors[info.name] = (shard, info)
    if weight_map is not None:
        for name, shard in weight_map.items():
            if tensors.get(name, (None,))[0] != shard:
                raise UserError(
                    f"{index_path} says tensor {name!r} is in {shard} but that shard does not contain it; "
                    "the checkpoint is incomplete, re-download it."
                )
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise UserError(f"{index_path} does not list tensor {extra[0]!r}; the index is stale, re-download it.")

    family = detect_family(config, list(tensors))
    moe_layers = _moe_layers(family, tensors, root)
    for key in (family.num_experts_key, family.top_k_key):
        if not isinstance(config.get(key), int):
            raise UserError(f"{root / 'config.json'} has no integer {key!r}; it is not a {family.name} config.")
    manifest = None
    if (root / MANIFEST_NAME).exists():
        manifest = _read_json(root / MANIFEST_NAME, "")
    known = {INDEX_NAME, "config.json", MANIFEST_NAME, *shard_names}
    others = tuple(sorted(p.name for p in root.iterdir() if p.name not in known))
    return Checkpoint(root, config, family, shards, tensors, moe_layers, index, manifest, others)


def _moe_layers(family: Family, tensors: Mapping[str, tuple[str, TensorInfo]], root: Path) -> dict[int, MoELayer]:
    routers: dict[int, dict[str, str]] = {}
    experts: dict[int, dict[int, dict[str, str]]] = {}
    for name in tensors:
        if m := family.router.match(name):
            routers.setdefault(int(m.group(1)), {})[m.group(2)] = name
        elif m := family.expert.match(name):
            experts.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})[m.group(3)] = name
    if not routers:
        raise UserError(f"{root} has no router tensors of a {family.name} model; is it a Mixture-of-Experts checkpoint?")
    layers: dict[int, MoELayer] = {}
    for layer in sorted(set(routers) | set(experts)):
        if layer not in routers or "weight" not in routers[layer]:
            raise UserError(f"{root}: layer {layer} has experts but no router weight; the checkpoint is incomplete.")
        by_expert = experts.get(layer, {})
        count = len(by_expert)
        if sorted(by_expert) != list(range(count)):
            missing = sorted(set(range(max(by_expert, default=-1) + 1)) - set(by_expert))
            raise UserError(f"{root}: layer {layer} lacks expert {missing[0]}; the checkpoint is incomplete.")
        params = set(by_expert[0]) if count else set()
        for j, p in by_expert.items():
            if set(p) != params:
                raise UserError(
                    f"{root}: layer {layer} expert {j} has parameters {sorted(p)}, expert 0 has {sorted(params)}."
                )
        router = tensors[routers[layer]["weight"]][1]
        if not router.shape or router.shape[0] != count:
            raise UserError(
                f"{root}: layer {layer} router has {router.shape[0] if router.shape else 0} rows but "
                f"{count} experts; the checkpoint is inconsistent."
            )
        layers[layer] = MoELayer(layer, routers[layer], {j: by_expert[j] for j in sorted(by_expert)})
    return layers

"""Router-frequency profiles and which experts a surgery drops.

Profile format (written by ``surgeon profile``, users may also write it by hand)::

    {"model": "...", "tokens": N, "top_k": k, "layers": {"0": [count of expert 0, ...], ...}, "source": "..."}

Ranking: per layer, least-routed first, ties broken by the lower expert index, so the choice is
deterministic. Layer targets: ``all``; ``early`` = the first quarter of the MoE layers, ``late`` = the
last quarter, a quarter being ``max(1, L // 4)`` layers (rounded down so a target never exceeds 25%;
12 of Qwen3-30B-A3B's 48 layers).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from epiconsole.errors import UserError

LayerTarget = Literal["all", "early", "late"]
Strategy = Literal["remove", "mask", "zero"]
LAYER_TARGETS: tuple[str, ...] = ("all", "early", "late")
STRATEGIES: tuple[str, ...] = ("remove", "mask", "zero")


@dataclass(frozen=True)
class Profile:
    """A validated router-frequency profile plus the sha256 of the file it came from."""

    model: str
    tokens: int
    top_k: int
    layers: Mapping[int, tuple[float, ...]]
    source: str
    sha256: str


def load_profile(path: Path | str) -> Profile:
    """Read and check a profile file; mistakes raise :class:`UserError` naming the file and the key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UserError(f"Cannot read profile {p}: {exc.strerror or exc}; run `epiconsole surgeon profile` first.") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"Profile {p} is not valid JSON ({exc}).") from None
    return parse_profile(data, where=str(p), sha256=hashlib.sha256(raw).hexdigest())


def parse_profile(data: Any, *, where: str = "profile", sha256: str = "") -> Profile:
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict) or not data["layers"]:
        raise UserError(f"{where}: expected an object with a non-empty \"layers\" map of layer -> expert counts.")
    layers: dict[int, tuple[float, ...]] = {}
    for key, counts in data["layers"].items():
        if not str(key).isdigit():
            raise UserError(f"{where}: layers key {key!r} is not a layer number.")
        if int(key) in layers:  # "1" and "01": one would silently replace the other
            raise UserError(f"{where}: layer {int(key)} is listed twice (as {key!r} too); keep one entry per layer.")
        if not isinstance(counts, list) or not counts:
            raise UserError(f"{where}: layers.{key} must be a non-empty list of counts, one per expert.")
        for c in counts:
            if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c < 0:
                raise UserError(f"{where}: layers.{key} holds {c!r}; counts must be non-negative numbers.")
        layers[int(key)] = tuple(counts)
    top_k = data.get("top_k", 0)
    tokens = data.get("tokens", 0)
    if not isinstance(top_k, int) or not isinstance(tokens, int) or top_k < 0 or tokens < 0:
        raise UserError(f"{where}: \"tokens\" and \"top_k\" must be non-negative integers.")
    return Profile(
        model=str(data.get("model", "")),
        tokens=tokens,
        top_k=top_k,
        layers=layers,
        source=str(data.get("source", "")),
        sha256=sha256 or hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest(),
    )


def least_routed(counts: Sequence[float], n: int) -> list[int]:
    """The ``n`` least-routed expert indices, ties by lower index, returned in ascending index order."""
    order = sorted(range(len(counts)), key=lambda j: (counts[j], j))
    return sorted(order[:n])


def target_layers(moe_layers: Sequence[int], target: str) -> list[int]:
    """The MoE layers a target names (first/last quarter, rounded down, at least one layer)."""
    layers = sorted(moe_layers)
    if target == "all":
        return layers
    quarter = max(1, len(layers) // 4)
    if target == "early":
        return layers[:quarter]
    if target == "late":
        return layers[-quarter:]
    raise UserError(f"--layers must be one of {', '.join(LAYER_TARGETS)}, not {target!r}.")


def plan_drops(
    profile: Profile,
    *,
    moe_layers: Mapping[int, int],
    top_k: int,
    experts: int,
    target: str,
    strategy: str,
) -> dict[int, list[int]]:
    """Per targeted layer, the experts to drop; refuses requests no runtime could load.

    ``moe_layers`` maps layer -> its expert count in the checkpoint.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}.")
    layers = target_layers(list(moe_layers), target)
    if strategy == "remove" and target != "all":
        raise UserError(
            f"--strategy remove needs --layers all: transformers, llama.cpp and distributed-llama load one "
            f"expert count for every layer, so dropping experts only in {target} layers must use "
            "--strategy mask (never routed) or --strategy zero (weights and router rows zeroed)."
        )
    if experts < 1:
        raise UserError("--experts must be at least 1 (the unmodified checkpoint is the baseline).")
    plan: dict[int, list[int]] = {}
    for layer in layers:
        count = moe_layers[layer]
        # remove and mask leave the router choosing top-k among the survivors, so k must survive.
        limit = count if strategy == "zero" else count - top_k
        if experts > limit:
            raise UserError(
                f"--experts {experts} is too many: layer {layer} has {count} experts and routes to {top_k}, "
                f"so at most {limit} can be dropped with --strategy {strategy}."
            )
        counts = profile.layers.get(layer)
        if counts is None:
            raise UserError(f"The profile has no counts for layer {layer}; profile this checkpoint again.")
        if len(counts) != count:
            raise UserError(
                f"The profile has {len(counts)} experts for layer {layer} but the checkpoint has {count}; "
                "profile the checkpoint you are pruning."
            )
        plan[layer] = least_routed(counts, experts)
    return plan

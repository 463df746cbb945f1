"""torch-side helpers for transformers MoE models: find the routers, mask experts at run time.

Imported only by ``profile`` and validation's generation step (it imports torch at module level).
Routers are found by module name (``layers.<i>.<block>.gate``), which covers Qwen3-MoE's ``mlp.gate``
and Mixtral's ``block_sparse_moe.gate`` (renamed ``mlp.gate`` by transformers 5), whether the gate is
a plain ``nn.Linear`` (transformers 4: returns logits) or a top-k router module (transformers 5:
returns ``(logits, scores, indices)``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

_GATE = re.compile(r"(?:^|\.)layers\.(\d+)\.[A-Za-z_]+\.gate$")


def router_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> router module of every MoE layer."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        m = _GATE.search(name)
        if m and isinstance(getattr(module, "weight", None), torch.Tensor):
            found[int(m.group(1))] = module
    return found


def selected_experts(output: Any, top_k: int) -> torch.Tensor:
    """The (tokens, top_k) expert indices a router output chose."""
    if isinstance(output, tuple):
        if len(output) >= 3 and isinstance(output[2], torch.Tensor) and not output[2].is_floating_point():
            return output[2]
        output = output[0]
    # A bare logits tensor: the block picks top-k of softmax(logits), which is top-k of the logits.
    return torch.topk(output.reshape(-1, output.shape[-1]), top_k, dim=-1).indices


def install_router_mask(model: torch.nn.Module, masked: Mapping[int, Sequence[int]]) -> list[Any]:
    """Give the listed experts a -inf router logit, so they are never routed; returns undo handles.

    This is what the ``mask`` strategy asks of a runtime, and it is mathematically the same as
    ``remove`` (softmax over the survivors). A large negative weight row is not a mask: its logit
    flips sign with the input.
    """
    routers = router_modules(model)
    handles: list[Any] = []
    for layer, experts in masked.items():
        if not experts:
            continue
        if layer not in routers:
            raise KeyError(f"layer {layer} has no router in this model")
        gate = routers[layer]
        bias = torch.zeros(gate.weight.shape[0], dtype=torch.float32)
        bias[list(experts)] = float("-inf")
        if isinstance(gate, torch.nn.Linear):
            handles.append(gate.register_forward_hook(lambda _m, _i, out, b=bias: out + b.to(out.dtype)))
            continue
        handles.append(_MaskedForward(gate, bias))
    return handles


class _MaskedForward:
    """Replaces a top-k router's forward with the same computation plus the mask (see transformers'
    ``Qwen3MoeTopKRouter`` / ``MixtralTopKRouter``); ``remove()`` restores the original."""

    def __init__(self, gate: torch.nn.Module, bias: torch.Tensor) -> None:
        self.gate = gate
        self.bias = bias
        gate.forward = self.forward  # instance attribute shadows the class method

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate = self.gate
        h = hidden_states.reshape(-1, gate.weight.shape[1])
        logits = F.linear(h, gate.weight) + self.bias.to(device=h.device, dtype=h.dtype)
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(probs, gate.top_k, dim=-1)
        if getattr(gate, "norm_topk_prob", True):
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        if hasattr(gate, "norm_topk_prob"):  # Qwen casts the scores back; Mixtral keeps float32
            top_value = top_value.to(logits.dtype)
        return logits, top_value, top_index

    def remove(self) -> None:
        self.gate.__dict__.pop("forward", None)


def masked_from_manifest(manifest: Mapping[str, Any]) -> dict[int, list[int]]:
    """The experts a ``mask`` surgery asks the runtime to mask, by layer (empty for other strategies)."""
    return {int(k): list(v) for k, v in (manifest.get("masked") or {}).items()}


def quiet_transformers() -> None:
    """No progress bars or advice on stderr: our own events are the progress the console reads."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()

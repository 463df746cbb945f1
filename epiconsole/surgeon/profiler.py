"""Router profiling: how often each expert is chosen on calibration text (torch + transformers).

A forward hook on every router records the top-k experts it picked for each token; padded positions
are excluded with the batch's attention mask, so batching does not change the counts. Sequences are
right-padded (causal attention keeps real tokens independent of the padding after them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from epiconsole.errors import UserError
from epiconsole.surgeon.layout import load_checkpoint
from epiconsole.surgeon.progress import Progress


def read_texts(files: Sequence[Path | str]) -> list[tuple[str, str]]:
    """(file name, text) for each calibration file; unreadable files are a user error."""
    texts = []
    for f in files:
        p = Path(f)
        try:
            texts.append((p.name, p.read_text(encoding="utf-8", errors="replace")))
        except OSError as exc:
            raise UserError(f"Cannot read calibration text {p}: {exc.strerror or exc}.") from None
    if not texts:
        raise UserError("Give at least one calibration text with --text FILE.")
    return texts


def chunk_tokens(token_lists: Sequence[list[int]], seq_len: int, max_tokens: int) -> list[list[int]]:
    """Cut each text's tokens into sequences of at most ``seq_len``, stopping at ``max_tokens`` in all."""
    seqs: list[list[int]] = []
    budget = max_tokens
    for ids in token_lists:
        for start in range(0, len(ids), seq_len):
            if budget <= 0:
                return seqs
            piece = ids[start : start + min(seq_len, budget)]
            seqs.append(piece)
            budget -= len(piece)
    return seqs


def profile_checkpoint(
    model_dir: Path | str,
    texts: Sequence[tuple[str, str]],
    *,
    max_tokens: int = 65536,
    seq_len: int = 512,
    batch_size: int = 8,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Count top-k router selections per layer and expert; returns the profile dict (documented format)."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError(
            "surgeon profile needs torch and transformers; install them with: pip install 'epiconsole[surgeon]'"
        ) from None
    from epiconsole.surgeon.runtime import quiet_transformers as _quiet_transformers
    from epiconsole.surgeon.runtime import router_modules, selected_experts

    progress = progress or Progress()
    if max_tokens < 1 or seq_len < 1 or batch_size < 1:
        raise UserError("--max-tokens, --seq-len and --batch-size must be at least 1.")
    ck = load_checkpoint(model_dir)
    top_k = ck.top_k
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ck.path))
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot load a tokenizer from {ck.path} ({exc}); copy the tokenizer files into it.") from None
    token_lists = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in texts]
    seqs = chunk_tokens(token_lists, seq_len, max_tokens)
    if not seqs:
        raise UserError("The calibration texts hold no tokens; give non-empty --text files.")
    _quiet_transformers()
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=dtype).to(dev).eval()
    routers = router_modules(model)
    if set(routers) != set(ck.moe_layers):
        raise UserError(
            f"transformers built routers for layers {sorted(routers)} but the checkpoint has MoE layers "
            f"{sorted(ck.moe_layers)}; this model layout is not supported."
        )
    counts = {layer: torch.zeros(ck.moe_layers[layer].num_experts, dtype=torch.long, device=dev) for layer in routers}
    state: dict[str, Any] = {"valid": None}

    def hook(layer: int):
        def record(_module: Any, _inputs: Any, output: Any) -> None:
            idx = selected_experts(output, top_k)
            valid = state["valid"]
            if idx.shape[0] != valid.shape[0]:
                raise RuntimeError(f"router of layer {layer} saw {idx.shape[0]} tokens, expected {valid.shape[0]}")
            counts[layer] += torch.bincount(idx[valid].reshape(-1), minlength=counts[layer].shape[0])

        return record

    handles = [module.register_forward_hook(hook(layer)) for layer, module in routers.items()]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = sum(len(s) for s in seqs)
    progress.emit("start", model=str(ck.path), sequences=len(seqs), tokens=total, device=dev)
    done = 0
    try:
        with torch.inference_mode():
            for b in range(0, len(seqs), batch_size):
                batch = seqs[b : b + batch_size]
                width = max(len(s) for s in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, s in enumerate(batch):
                    ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                    mask[i, : len(s)] = 1
                state["valid"] = mask.reshape(-1).bool().to(dev)
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
                done += int(mask.sum())
                progress.emit("batch", done=done, total=total)
    finally:
        for h in handles:
            h.remove()
    return {
        "model": str(ck.config.get("_name_or_path") or ck.path.name),
        "tokens": done,
        "top_k": top_k,
        "layers": {str(layer): counts[layer].cpu().tolist() for layer in sorted(counts)},
        "source": (
            f"measured: router top-{top_k} selections on {done} tokens of {', '.join(n for n, _ in texts)} "
            f"(seq_len {seq_len}, {dev}, transformers {transformers.__version__}, "
            f"{time.perf_counter() - t0:.1f} s)"
        ),
    }

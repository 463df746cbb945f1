"""Tiny synthetic Qwen3-MoE checkpoints and router profiles (numpy only, no torch).

The simulated lab's DGX prunes these with the real surgeon commands, and the tests build them to
check the surgery against transformers. Weights are random but scaled so activations stay O(1) and
router logits are well separated (no top-k ties in bf16). A character-level tokenizer is written as
plain ``tokenizer.json`` so ``AutoTokenizer`` loads the checkpoint without any download.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Literal

from epiconsole.surgeon.layout import INDEX_NAME, SINGLE_NAME, load_checkpoint
from epiconsole.surgeon.safetensors_io import float32_to_bf16_bits, write_arrays

SPECIAL_TOKENS = ("<unk>", "<pad>", "<eos>")


def make_tiny_checkpoint(
    path: Path | str,
    *,
    layers: int = 4,
    experts: int = 8,
    top_k: int = 2,
    hidden: int = 32,
    intermediate: int = 16,
    vocab: int = 64,
    shards: int = 2,
    dtype: Literal["bfloat16", "float32"] = "bfloat16",
    seed: int = 0,
    heads: int = 4,
    kv_heads: int = 2,
    norm_topk_prob: bool = True,
) -> Path:
    """Write a random Qwen3-MoE checkpoint (config, sharded safetensors, index, tokenizer) to ``path``."""
    import numpy as np

    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, not {dtype!r}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = max(2, hidden // heads)
    if head_dim % 2:
        head_dim += 1  # rotary embeddings need an even head size

    def w(*shape: int, std: float | None = None) -> Any:
        scale = std if std is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors: dict[str, Any] = {"model.embed_tokens.weight": w(vocab, hidden, std=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = np.ones(hidden, np.float32)
        tensors[f"{p}.self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        tensors[f"{p}.self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        tensors[f"{p}.self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        tensors[f"{p}.self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        tensors[f"{p}.self_attn.q_norm.weight"] = np.ones(head_dim, np.float32)
        tensors[f"{p}.self_attn.k_norm.weight"] = np.ones(head_dim, np.float32)
        tensors[f"{p}.post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        # Router std 2/sqrt(hidden) gives logits of about +-2: distinct top-k choices even in bf16.
        tensors[f"{p}.mlp.gate.weight"] = w(experts, hidden, std=2.0 / np.sqrt(hidden))
        for j in range(experts):
            e = f"{p}.mlp.experts.{j}"
            tensors[f"{e}.gate_proj.weight"] = w(intermediate, hidden)
            tensors[f"{e}.up_proj.weight"] = w(intermediate, hidden)
            tensors[f"{e}.down_proj.weight"] = w(hidden, intermediate)
    tensors["model.norm.weight"] = np.ones(hidden, np.float32)
    tensors["lm_head.weight"] = w(vocab, hidden)

    if dtype == "bfloat16":
        stored: dict[str, Any] = {k: ("BF16", float32_to_bf16_bits(v)) for k, v in tensors.items()}
    else:
        stored = dict(tensors)

    names = list(stored)
    shards = max(1, min(shards, len(names)))
    total = sum(v[1].nbytes if isinstance(v, tuple) else v.nbytes for v in stored.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for name in names:
        v = stored[name]
        nbytes = v[1].nbytes if isinstance(v, tuple) else v.nbytes
        # Fill shards in order by cumulative size so each holds about total/shards bytes.
        groups[min(shards - 1, acc * shards // total)].append(name)
        acc += nbytes
    metadata = {"format": "pt"}
    if shards == 1:
        write_arrays(root / SINGLE_NAME, stored, metadata)
    else:
        weight_map: dict[str, str] = {}
        for s, group in enumerate(groups):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            write_arrays(root / file, {k: stored[k] for k in group}, metadata)
            weight_map.update(dict.fromkeys(group, file))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate * 2,
        "moe_intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": dtype,
        "epi_synthetic": f"simulated: random weights, seed {seed}",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (root / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}, indent=2) + "\n", encoding="utf-8"
    )
    _write_tokenizer(root, vocab)
    return root


def _write_tokenizer(root: Path, vocab: int) -> None:
    """A character-level tokenizer in the ``tokenizers`` JSON format (BPE with no merges)."""
    chars = " " + string.ascii_lowercase + string.digits + ".,;:!?'-()\n" + string.ascii_uppercase
    tokens = list(SPECIAL_TOKENS) + [c for c in chars][: max(0, vocab - len(SPECIAL_TOKENS))]
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [],
        },
    }
    (root / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "eos_token": "<eos>",
        "model_max_length": 512,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def make_profile(checkpoint_dir: Path | str, seed: int = 0, tokens: int = 4096) -> dict[str, Any]:
    """A synthetic router-frequency profile for a checkpoint, in the documented profile format.

    Each layer gets a skewed (log-normal) preference over its experts; each of ``tokens`` tokens then
    picks ``top_k`` distinct experts (Gumbel top-k sampling), as a real router would. Labelled
    simulated in ``source``.
    """
    import numpy as np

    ck = load_checkpoint(checkpoint_dir)
    rng = np.random.default_rng(seed)
    k = ck.top_k
    layers: dict[str, list[int]] = {}
    for layer, moe in sorted(ck.moe_layers.items()):
        e = moe.num_experts
        logp = rng.normal(0.0, 1.0, e)
        g = logp + rng.gumbel(size=(tokens, e))
        picks = np.argpartition(-g, k - 1, axis=1)[:, :k] if k < e else np.tile(np.arange(e), (tokens, 1))
        layers[str(layer)] = np.bincount(picks.ravel(), minlength=e).astype(int).tolist()
    return {
        "model": str(ck.config.get("_name_or_path") or Path(checkpoint_dir).name),
        "tokens": tokens,
        "top_k": k,
        "layers": layers,
        "source": f"simulated: synthetic router frequencies (seed {seed}), not measured",
    }

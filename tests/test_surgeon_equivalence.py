"""The surgery against a real client: transformers' Qwen3-MoE class loads the pruned checkpoint and
its logits equal the original's with -inf router logits on the dropped experts; profiling counts what
the routers really chose, padding excluded; validation generates with the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from surgeon_fixtures import _private_hash_cache, build  # noqa: E402, F401
from transformers import Qwen3MoeForCausalLM  # noqa: E402

from epiconsole.cli import main  # noqa: E402
from epiconsole.surgeon.drop import drop_experts  # noqa: E402
from epiconsole.surgeon.profiler import profile_checkpoint  # noqa: E402
from epiconsole.surgeon.runtime import install_router_mask, quiet_transformers  # noqa: E402
from epiconsole.surgeon.validate import validate_checkpoint  # noqa: E402

quiet_transformers()
TEXT = "the quick brown fox jumps over the lazy dog. " * 6 + "pack my box with five dozen liquor jugs!"


def load(path: Path, dtype: torch.dtype = torch.float32) -> Qwen3MoeForCausalLM:
    return Qwen3MoeForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def logits(model: Qwen3MoeForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_removed_model_equals_original_with_masked_router(tmp_path: Path, dtype: str, atol: float) -> None:
    src, prof = build(tmp_path, dtype=dtype, experts=8, top_k=2, layers=3, shards=2, seed=7)
    out = tmp_path / "removed"
    result = drop_experts(src, experts=3, layers="all", strategy="remove", profile=prof, out=out)
    torch_dtype = getattr(torch, dtype)
    original, pruned = load(src, torch_dtype), load(out, torch_dtype)
    assert pruned.config.num_experts == 5
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(1))
    unmasked = logits(original, ids)
    install_router_mask(original, {int(k): v for k, v in result.manifest["dropped"].items()})
    masked = logits(original, ids)
    got = logits(pruned, ids)
    torch.testing.assert_close(got, masked, atol=atol, rtol=atol)
    # The test can fail: without the mask the original model disagrees.
    assert (got - unmasked).abs().max() > 10 * atol


def test_mask_manifest_applied_at_run_time_equals_remove_and_zero_differs(tmp_path: Path) -> None:
    src, prof = build(tmp_path, dtype="float32", experts=8, top_k=2, layers=4, seed=3)
    masked_dir, removed_dir, zero_dir = tmp_path / "mask", tmp_path / "remove", tmp_path / "zero"
    m = drop_experts(src, experts=2, layers="all", strategy="mask", profile=prof, out=masked_dir).manifest
    drop_experts(src, experts=2, layers="all", strategy="remove", profile=prof, out=removed_dir)
    drop_experts(src, experts=2, layers="all", strategy="zero", profile=prof, out=zero_dir)
    ids = torch.randint(3, 60, (1, 32), generator=torch.Generator().manual_seed(2))
    masked_model = load(masked_dir)
    install_router_mask(masked_model, {int(k): v for k, v in m["masked"].items()})
    removed = logits(load(removed_dir), ids)
    torch.testing.assert_close(logits(masked_model, ids), removed, atol=1e-5, rtol=1e-5)
    # zero keeps the experts routable (they return nothing), so it is a different model.
    assert (logits(load(zero_dir), ids) - removed).abs().max() > 1e-3


def test_profile_counts_what_the_routers_chose_and_ignores_padding(tmp_path: Path) -> None:
    src, _ = build(tmp_path, dtype="float32", experts=8, top_k=2, layers=3, seed=5)
    texts = [("a.txt", TEXT), ("b.txt", TEXT[:37]), ("c.txt", "hello world")]
    batched = profile_checkpoint(src, texts, max_tokens=10_000, seq_len=64, batch_size=3, device="cpu")
    single = profile_checkpoint(src, texts, max_tokens=10_000, seq_len=64, batch_size=1, device="cpu")
    assert batched["layers"] == single["layers"]
    n = len(TEXT) + 37 + len("hello world")  # one character per token
    assert batched["tokens"] == n and batched["top_k"] == 2
    assert all(sum(c) == n * 2 for c in batched["layers"].values())
    # Independent count from transformers' own router-logit outputs, one unpadded text at a time.
    model = load(src)
    expected = {str(i): torch.zeros(8, dtype=torch.long) for i in range(3)}
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    for _, text in texts:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        for start in range(0, ids.shape[1], 64):
            with torch.inference_mode():
                out = model(input_ids=ids[:, start : start + 64], output_router_logits=True)
            for layer, rl in enumerate(out.router_logits):
                expected[str(layer)] += torch.bincount(rl.topk(2, dim=-1).indices.reshape(-1), minlength=8)
    assert batched["layers"] == {k: v.tolist() for k, v in expected.items()}
    capped = profile_checkpoint(src, texts, max_tokens=50, seq_len=16, batch_size=2, device="cpu")
    assert capped["tokens"] == 50


def test_profile_then_drop_then_validate_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = build(tmp_path, dtype="bfloat16", seed=11)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    profile = tmp_path / "profile.json"
    assert main(["surgeon", "profile", str(src), "--text", str(text), "--max-tokens", "200", "--out", str(profile), "--json"]) == 0
    data = json.loads(profile.read_text())
    assert set(data) == {"model", "tokens", "top_k", "layers", "source"} and data["tokens"] == 200
    out = tmp_path / "late"
    assert main(["surgeon", "drop", str(src), "--experts", "2", "--layers", "late", "--strategy", "mask",
                 "--profile", str(profile), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["surgeon", "validate", str(out), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    generation = next(e for e in events if e.get("name") == "generation")
    assert generation["ok"] and not generation["skipped"]
    checks = validate_checkpoint(out)
    assert all(c.ok for c in checks) and checks[-1].name == "generation"


def test_validate_generation_fails_when_transformers_would_fill_in_missing_weights(tmp_path: Path) -> None:
    from epiconsole.surgeon.safetensors_io import read_array, read_header, write_arrays

    src, _ = build(tmp_path, dtype="float32", shards=1)
    shard = src / "model.safetensors"
    header = read_header(shard)
    arrays = {t.name: read_array(shard, t) for t in header.tensors if t.name != "model.norm.weight"}
    write_arrays(shard, arrays, {"format": "pt"})
    checks = validate_checkpoint(src)
    assert [c.name for c in checks if not c.ok] == ["generation"]
    assert "missing keys" in checks[-1].detail and "norm" in checks[-1].detail


def _to_mixtral(src: Path, dst: Path) -> Path:
    """Rewrite a synthetic Qwen3-MoE checkpoint as a Mixtral one (block_sparse_moe, w1/w2/w3)."""
    from epiconsole.surgeon.safetensors_io import read_array, read_header, write_arrays

    rename = {"mlp.gate.": "block_sparse_moe.gate.", "mlp.experts.": "block_sparse_moe.experts.",
              "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    header = read_header(src / "model.safetensors")
    arrays = {}
    for info in header.tensors:
        if "_norm." in info.name and "self_attn" in info.name:
            continue  # Mixtral has no q/k norms
        name = info.name
        for a, b in rename.items():
            name = name.replace(a, b)
        arrays[name] = read_array(src / "model.safetensors", info)
    dst.mkdir()
    write_arrays(dst / "model.safetensors", arrays, {"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=cfg.pop("num_experts"),
               intermediate_size=cfg.pop("moe_intermediate_size"), sliding_window=None)
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_mixtral_profile_and_remove_match_transformers(tmp_path: Path) -> None:
    src, _ = build(tmp_path, dtype="float32", shards=1, experts=8, top_k=2, layers=2, seed=4)
    mix = _to_mixtral(src, tmp_path / "mixtral")
    profile = profile_checkpoint(mix, [("t", TEXT)], max_tokens=120, seq_len=50, batch_size=2, device="cpu")
    assert profile["tokens"] == 120 and all(sum(c) == 240 for c in profile["layers"].values())
    prof = tmp_path / "mix-profile.json"
    prof.write_text(json.dumps(profile))
    out = tmp_path / "mix-out"
    result = drop_experts(mix, experts=3, layers="all", strategy="remove", profile=prof, out=out)
    original = transformers.MixtralForCausalLM.from_pretrained(str(mix), dtype=torch.float32).eval()
    pruned = transformers.MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert pruned.config.num_local_experts == 5
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(3))
    install_router_mask(original, {int(k): v for k, v in result.manifest["dropped"].items()})
    torch.testing.assert_close(logits(pruned, ids), logits(original, ids), atol=1e-5, rtol=1e-5)

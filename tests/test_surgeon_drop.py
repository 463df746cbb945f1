"""``surgeon drop`` on tiny sharded checkpoints: exact experts, renumbering, router rows, config, index,
manifest, refusals, damaged sources leaving no output, no-op re-runs, and no torch on the way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from surgeon_fixtures import _private_hash_cache, build, tree_digest  # noqa: F401

from epiconsole.cli import main
from epiconsole.errors import UserError
from epiconsole.surgeon.drop import drop_experts
from epiconsole.surgeon.layout import INDEX_NAME, MANIFEST_NAME, load_checkpoint
from epiconsole.surgeon.ranking import least_routed
from epiconsole.surgeon.validate import validate_checkpoint

E, K, L = 8, 2, 4


def load_all(root: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def expert(layer: int, j: int, param: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{j}.{param}.weight"


@pytest.fixture
def fp32(tmp_path: Path) -> tuple[Path, Path]:
    return build(tmp_path, dtype="float32", shards=3, layers=L, experts=E, top_k=K)


def test_remove_all_layers_drops_exactly_the_least_routed(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    before = tree_digest(src)
    profile = json.loads(prof.read_text())
    out = tmp_path / "out"
    result = drop_experts(src, experts=3, layers="all", strategy="remove", profile=prof, out=out)
    assert not result.noop
    assert tree_digest(src) == before  # the source is never modified
    orig, new = load_all(src), load_all(out)
    for layer in range(L):
        dropped = least_routed(profile["layers"][str(layer)], 3)
        assert result.manifest["dropped"][str(layer)] == dropped
        kept = [j for j in range(E) if j not in dropped]
        assert result.manifest["kept"][str(layer)] == kept
        # Survivors renumbered in order; nothing beyond E-3 remains.
        for new_j, old_j in enumerate(kept):
            for param in ("gate_proj", "up_proj", "down_proj"):
                np.testing.assert_array_equal(new[expert(layer, new_j, param)], orig[expert(layer, old_j, param)])
        assert expert(layer, E - 3, "gate_proj") not in new
        router = f"model.layers.{layer}.mlp.gate.weight"
        np.testing.assert_array_equal(new[router], orig[router][kept])
    # Everything that is not an expert or router is byte-identical.
    for name, arr in orig.items():
        if ".mlp." not in name:
            np.testing.assert_array_equal(new[name], arr)
    assert len(new) == len(orig) - L * 3 * 3
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == E - 3
    assert {k: v for k, v in config.items() if k != "num_experts"} == {
        k: v for k, v in json.loads((src / "config.json").read_text()).items() if k != "num_experts"
    }
    index = json.loads((out / INDEX_NAME).read_text())
    ck = load_checkpoint(out)
    assert set(index["weight_map"]) == set(new)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in new.values()) == ck.data_bytes
    # Sizes add up: each shard = 8-byte length + header + its tensors.
    for shard, header in ck.shards.items():
        assert header.size == header.header_bytes + sum(t.nbytes for t in header.tensors)
        assert {e["file"]: e["bytes"] for e in result.manifest["output_shards"]}[shard] == header.size
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    assert all(c.ok for c in validate_checkpoint(out, generate=False))


def test_bf16_remove_and_single_file_checkpoint(tmp_path: Path) -> None:
    src, prof = build(tmp_path, dtype="bfloat16", shards=1)
    out = tmp_path / "out"
    result = drop_experts(src, experts=1, layers="all", strategy="remove", profile=prof, out=out)
    assert not (out / INDEX_NAME).exists() and (out / "model.safetensors").exists()
    ck_src, ck_out = load_checkpoint(src), load_checkpoint(out)
    assert ck_out.num_experts == ck_src.num_experts - 1
    from epiconsole.surgeon.safetensors_io import read_array

    for layer, dropped in result.manifest["dropped"].items():
        name = f"model.layers.{layer}.mlp.gate.weight"
        a = read_array(src / "model.safetensors", ck_src.info(name))
        b = read_array(out / "model.safetensors", ck_out.info(name))
        np.testing.assert_array_equal(b, np.delete(a, dropped, axis=0))


def test_mask_leaves_weights_untouched_and_lists_the_experts(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    out = tmp_path / "masked"
    result = drop_experts(src, experts=2, layers="late", strategy="mask", profile=prof, out=out)
    profile = json.loads(prof.read_text())
    assert result.manifest["masked"] == {str(L - 1): least_routed(profile["layers"][str(L - 1)], 2)}
    for f in src.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_zero_zeroes_experts_and_router_rows_only_in_targeted_layers(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    out = tmp_path / "zeroed"
    result = drop_experts(src, experts=2, layers="early", strategy="zero", profile=prof, out=out)
    assert list(result.manifest["dropped"]) == ["0"]
    dropped = result.manifest["dropped"]["0"]
    orig, new = load_all(src), load_all(out)
    assert set(orig) == set(new)
    for name, arr in orig.items():
        target = any(name.startswith(f"model.layers.0.mlp.experts.{j}.") for j in dropped)
        if target:
            assert not new[name].any()
        elif name == "model.layers.0.mlp.gate.weight":
            assert not new[name][dropped].any()
            keep = [j for j in range(E) if j not in dropped]
            np.testing.assert_array_equal(new[name][keep], arr[keep])
        else:
            np.testing.assert_array_equal(new[name], arr)
    assert all(c.ok for c in validate_checkpoint(out, generate=False))


def test_non_uniform_remove_is_refused_with_the_alternatives(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    with pytest.raises(UserError) as exc:
        drop_experts(src, experts=1, layers="early", strategy="remove", profile=prof, out=tmp_path / "o")
    assert "mask" in str(exc.value) and "zero" in str(exc.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("experts", [0, E - K + 1])
def test_impossible_counts_are_refused(tmp_path: Path, fp32: tuple[Path, Path], experts: int) -> None:
    src, prof = fp32
    with pytest.raises(UserError, match="--experts"):
        drop_experts(src, experts=experts, layers="all", strategy="remove", profile=prof, out=tmp_path / "o")


def test_profile_for_another_model_is_refused(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, _ = fp32
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"layers": {str(i): [1] * (E + 1) for i in range(L)}}))
    with pytest.raises(UserError, match="profile the checkpoint you are pruning"):
        drop_experts(src, experts=1, layers="all", strategy="remove", profile=other, out=tmp_path / "o")


def _no_partial_output(tmp_path: Path) -> None:
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_truncated_shard_gives_a_clear_error_and_no_output(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    shard = sorted(src.glob("*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(UserError, match="truncated") as exc:
        drop_experts(src, experts=1, layers="all", strategy="remove", profile=prof, out=tmp_path / "o")
    assert shard.name in str(exc.value)
    _no_partial_output(tmp_path)


def test_index_naming_a_missing_tensor_gives_a_clear_error_and_no_output(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.9.mlp.gate.weight"] = next(iter(index["weight_map"].values()))
    (src / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"model\.layers\.9\.mlp\.gate\.weight.*does not contain it"):
        drop_experts(src, experts=1, layers="all", strategy="remove", profile=prof, out=tmp_path / "o")
    _no_partial_output(tmp_path)


def test_a_shard_shrinking_mid_copy_leaves_no_output(tmp_path: Path, fp32: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after writing began (here: a source shard truncated between planning and copying)."""
    src, prof = fp32
    import epiconsole.surgeon.drop as drop_mod

    real_build = drop_mod.build_plans

    def build_then_truncate(*args, **kwargs):  # noqa: ANN002, ANN003
        plans = real_build(*args, **kwargs)
        shard = sorted(src.glob("*.safetensors"))[-1]
        os.truncate(shard, shard.stat().st_size // 2)
        return plans

    monkeypatch.setattr(drop_mod, "build_plans", build_then_truncate)
    with pytest.raises(UserError, match="ended early"):
        drop_experts(src, experts=1, layers="all", strategy="zero", profile=prof, out=tmp_path / "o", workers=1)
    _no_partial_output(tmp_path)


def test_rerun_is_a_noop_and_a_different_request_is_refused(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    out = tmp_path / "o"
    drop_experts(src, experts=2, layers="all", strategy="remove", profile=prof, out=out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = drop_experts(src, experts=2, layers="all", strategy="remove", profile=prof, out=out)
    assert again.noop and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(UserError, match="different surgery"):
        drop_experts(src, experts=3, layers="all", strategy="remove", profile=prof, out=out)
    # The same request on a source that changed since is not a no-op, and the message says why.
    shard = sorted(src.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(UserError, match="earlier version of the source"):
        drop_experts(src, experts=2, layers="all", strategy="remove", profile=prof, out=out)


def test_manifest_digests_match_the_bytes_and_the_cache_skips_rehashing(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    import hashlib

    from epiconsole.surgeon.digest import file_digests

    src, prof = fp32
    first = drop_experts(src, experts=1, layers="all", strategy="remove", profile=prof, out=tmp_path / "a")
    cache = json.loads(Path(os.environ["EPICONSOLE_SURGEON_CACHE"]).read_text())
    assert len(cache) == 3
    for entry in first.manifest["source_shards"]:
        digest, tensors = file_digests(src / entry["file"])
        assert entry["digest"] == digest and digest.startswith("tree-sha256:")
        assert tensors in cache.values()
        # The tree digest really covers the data: each tensor's sha256 is of its bytes.
        header = load_checkpoint(src).shards[entry["file"]]
        data = (src / entry["file"]).read_bytes()
        t = header.tensors[0]
        assert tensors[t.name] == hashlib.sha256(data[t.begin : t.end]).hexdigest()
    # Output digests computed during the copy (from cached and fresh tensor digests) equal a re-hash.
    for strategy, out in (("zero", tmp_path / "b"), ("remove", tmp_path / "c")):
        result = drop_experts(src, experts=2, layers="all", strategy=strategy, profile=prof, out=out)
        assert result.manifest["source_shards"] == first.manifest["source_shards"]
        for entry in result.manifest["output_shards"]:
            assert entry["digest"] == file_digests(out / entry["file"])[0]
    assert first.manifest["profile"]["sha256"] == hashlib.sha256(prof.read_bytes()).hexdigest()


def test_validate_catches_a_corrupted_output(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    out = tmp_path / "o"
    drop_experts(src, experts=1, layers="all", strategy="remove", profile=prof, out=out)
    ck = load_checkpoint(out)
    shard, info = ck.tensors["model.layers.1.mlp.gate.weight"]
    with open(out / shard, "r+b") as f:  # a NaN in a touched tensor
        f.seek(info.begin)
        f.write(np.array([np.nan], np.float32).tobytes())
    failed = {c.name for c in validate_checkpoint(out, generate=False) if not c.ok}
    assert failed == {"manifest shard hashes", "finite values"}


def test_cli_validate_failure_is_exit_1_with_an_error_event(
    tmp_path: Path, fp32: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, prof = fp32
    out = tmp_path / "o"
    drop_experts(src, experts=1, layers="all", strategy="zero", profile=prof, out=out)
    ck = load_checkpoint(out)
    name = ck.moe_layers[0].experts[ck.manifest["dropped"]["0"][0]]["up_proj.weight"]
    shard, info = ck.tensors[name]
    with open(out / shard, "r+b") as f:  # a zeroed expert that is not zero any more
        f.seek(info.begin)
        f.write(np.array([1.0], np.float32).tobytes())
    capsys.readouterr()
    assert main(["surgeon", "validate", str(out), "--no-generate", "--json"]) == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-2]["event"] == "error" and events[-2]["message"].startswith("validation failed: manifest shard hashes")
    assert events[-1]["event"] == "done" and set(events[-1]["failed"]) == {"manifest shard hashes", "manifest: experts zeroed"}


def test_hash_cache_forgets_sources_that_are_gone(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    import shutil

    src, prof = fp32
    cache = Path(os.environ["EPICONSOLE_SURGEON_CACHE"])
    drop_experts(src, experts=1, layers="all", strategy="remove", profile=prof, out=tmp_path / "a")
    other, other_prof = build(tmp_path, "other", seed=1)
    shutil.rmtree(src)
    drop_experts(other, experts=1, layers="all", strategy="remove", profile=other_prof, out=tmp_path / "b")
    keys = json.loads(cache.read_text())
    assert len(keys) == 2 and all(k.startswith(str(other.resolve())) for k in keys)


def test_cli_json_events_and_exit_codes(tmp_path: Path, fp32: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    src, prof = fp32
    out = tmp_path / "o"
    argv = ["surgeon", "drop", str(src), "--experts", "1", "--profile", str(prof), "--out", str(out), "--json"]
    assert main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("shard") == 3 and "tensor" in kinds
    assert events[-1]["manifest"] == str(out / MANIFEST_NAME)
    assert main([*argv[:4], "2", *argv[5:-2], str(tmp_path / "p"), "--layers", "late", "--json"]) == 2
    error = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert error["event"] == "error" and "--strategy remove needs --layers all" in error["message"]
    assert main(["surgeon", "validate", str(out), "--no-generate", "--json"]) == 0
    done = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert done == {"event": "done", "out": str(out), "ok": True, "failed": []}
    assert main(["surgeon", "inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_experts"] == E - 1 and summary["surgery"]["strategy"] == "remove"
    assert main(["surgeon", "inspect", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    # A profile that could not be written is refused before any profiling starts.
    (tmp_path / "calib.txt").write_text("some calibration text")
    assert main(["surgeon", "profile", str(src), "--text", str(tmp_path / "calib.txt"),
                 "--out", str(tmp_path / "no" / "such" / "p.json"), "--json"]) == 2
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["error"] and "does not exist" in events[0]["message"]


def test_headless_commands_never_import_torch(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    code = (
        "import sys\nfrom epiconsole.cli import main\n"
        f"assert main(['surgeon', 'inspect', {str(src)!r}]) == 0\n"
        f"assert main(['surgeon', 'drop', {str(src)!r}, '--experts', '1', '--profile', {str(prof)!r}, '--out', {str(tmp_path / 'o')!r}]) == 0\n"
        f"assert main(['surgeon', 'validate', {str(tmp_path / 'o')!r}, '--no-generate']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors', 'textual') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ)
    assert proc.returncode == 0, proc.stderr


def test_mixtral_keys_come_from_the_family_table(tmp_path: Path) -> None:
    """Same surgery on Mixtral-style names (block_sparse_moe.gate, experts.{j}.w1/w2/w3, num_local_experts)."""
    from epiconsole.surgeon.safetensors_io import read_array, read_header, write_arrays

    src, prof = build(tmp_path, dtype="float32", shards=1)
    rename = {"mlp.gate.": "block_sparse_moe.gate.", "mlp.experts.": "block_sparse_moe.experts.",
              "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    header = read_header(src / "model.safetensors")
    arrays = {}
    for info in header.tensors:
        name = info.name
        for a, b in rename.items():
            name = name.replace(a, b)
        arrays[name] = np.array(read_array(src / "model.safetensors", info))
    mix = tmp_path / "mixtral"
    mix.mkdir()
    write_arrays(mix / "model.safetensors", arrays, {"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=config.pop("num_experts"))
    (mix / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = drop_experts(mix, experts=2, layers="all", strategy="remove", profile=prof, out=out)
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == E - 2
    new = load_file(str(out / "model.safetensors"))
    for layer, kept in result.manifest["kept"].items():
        for new_j, old_j in enumerate(kept):
            np.testing.assert_array_equal(
                new[f"model.layers.{layer}.block_sparse_moe.experts.{new_j}.w2.weight"],
                arrays[f"model.layers.{layer}.block_sparse_moe.experts.{old_j}.w2.weight"],
            )
        gate = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        np.testing.assert_array_equal(new[gate], arrays[gate][kept])
    assert load_checkpoint(out).family.name == "mixtral"


def test_stale_temp_dirs_of_dead_runs_are_removed(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    stale = tmp_path / ".o.tmp-999999999"  # no such process
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x")
    (tmp_path / "o").mkdir()  # an empty --out made beforehand is fine
    drop_experts(src, experts=1, layers="all", strategy="remove", profile=prof, out=tmp_path / "o")
    assert not stale.exists() and (tmp_path / "o" / MANIFEST_NAME).exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_cancelled_job_leaves_no_output(tmp_path: Path, fp32: tuple[Path, Path], signum: int) -> None:
    src, prof = fp32
    out = tmp_path / "o"
    code = (
        "import sys, time\nimport epiconsole.surgeon.drop as d\nfrom epiconsole.cli import main\n"
        "real = d._write_all\n"
        "def slow(fd, data):\n    time.sleep(0.05)\n    real(fd, data)\n"
        "d._write_all = slow\n"
        f"sys.exit(main(['surgeon', 'drop', {str(src)!r}, '--experts', '1', '--profile', {str(prof)!r}, "
        f"'--out', {str(out)!r}, '--json', '--workers', '1']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "start"
        proc.send_signal(signum)
        assert proc.wait(timeout=20) == 128 + signum
    finally:
        proc.kill()
    assert not out.exists()
    assert not list(tmp_path.glob(".o.tmp-*"))


def test_a_write_that_fails_is_one_sentence_and_leaves_no_output(tmp_path: Path, fp32: tuple[Path, Path]) -> None:
    src, prof = fp32
    out = tmp_path / "o"
    limit = min(p.stat().st_size for p in src.glob("*.safetensors")) // 2
    # A real write failure (EFBIG past a file-size limit, as ENOSPC on a full disk) in a child process.
    code = (
        "import resource, signal, sys\nfrom epiconsole.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        f"sys.exit(main(['surgeon', 'drop', {str(src)!r}, '--experts', '1', '--profile', {str(prof)!r}, "
        f"'--out', {str(out)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert err[-1].startswith("epiconsole: Writing")
    assert "File too large" in err[-1] and "check free space" in err[-1]
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))

"""Our safetensors reader/writer against the real safetensors library, and header damage handling."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from epiconsole.errors import UserError
from epiconsole.surgeon.ranking import least_routed, parse_profile, target_layers
from epiconsole.surgeon.safetensors_io import (
    bf16_bits_to_float32,
    count_nonfinite,
    float32_to_bf16_bits,
    read_array,
    read_header,
    write_arrays,
)


def test_reads_files_written_by_the_safetensors_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {
        "b": rng.standard_normal((3, 5)).astype(np.float32),
        "a": rng.integers(-9, 9, (7,)).astype(np.int64),
        "c.half": rng.standard_normal((2, 2, 2)).astype(np.float16),
        "scalar": np.array(3.5, dtype=np.float64),
    }
    path = tmp_path / "lib.safetensors"
    save_file(arrays, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    assert {t.name for t in header.tensors} == set(arrays)
    assert header.header_bytes % 8 == 0
    for info in header.tensors:
        np.testing.assert_array_equal(read_array(path, info), arrays[info.name])
        assert info.shape == arrays[info.name].shape


def test_library_reads_files_we_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    f32 = rng.standard_normal((4, 6)).astype(np.float32)
    path = tmp_path / "ours.safetensors"
    write_arrays(path, {"x": f32, "y": ("BF16", float32_to_bf16_bits(f32)), "z": np.arange(5, dtype=np.int32)}, {"k": "v"})
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load_file

    loaded = torch_load_file(str(path))
    np.testing.assert_array_equal(loaded["x"].numpy(), f32)
    np.testing.assert_array_equal(loaded["z"].numpy(), np.arange(5, dtype=np.int32))
    assert loaded["y"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["y"].float().numpy(), bf16_bits_to_float32(float32_to_bf16_bits(f32)))


def test_bf16_rounding_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).standard_normal(10_000).astype(np.float32) * 1000
    ours = float32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_nonfinite_counts_per_dtype() -> None:
    f = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], dtype=np.float32)
    assert count_nonfinite(f, "F32") == 3
    assert count_nonfinite(f.astype(np.float16), "F16") == 3
    assert count_nonfinite(float32_to_bf16_bits(f), "BF16") == 3
    assert count_nonfinite(float32_to_bf16_bits(np.array([1e38, -2.0], np.float32)), "BF16") == 0
    assert count_nonfinite(np.array([1, 2], np.int64), "I64") == 0


def _write(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12, "do not match its shape"),
        ({"t": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        (
            {"t": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}, "u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
            b"\0" * 4,
            "hole or overlaps",
        ),
        ({"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 5, "unexpected bytes"),
    ],
)
def test_damaged_headers_are_one_sentence_errors(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    _write(path, header, data)
    with pytest.raises(UserError, match=message) as exc:
        read_header(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_not_safetensors_at_all(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(UserError, match="truncated or not a safetensors file"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(UserError, match="not JSON"):
        read_header(path)


def test_ranking_least_routed_first_ties_by_index() -> None:
    assert least_routed([5, 1, 1, 0, 9], 1) == [3]
    assert least_routed([5, 1, 1, 0, 9], 2) == [1, 3]  # tie between 1 and 2 goes to the lower index
    assert least_routed([2, 2, 2, 2], 3) == [0, 1, 2]


def test_layer_targets_are_quarters_rounded_down() -> None:
    assert target_layers(range(48), "early") == list(range(12))
    assert target_layers(range(48), "late") == list(range(36, 48))
    assert target_layers(range(4), "early") == [0]
    assert target_layers(range(6), "late") == [5]
    assert target_layers(range(3), "all") == [0, 1, 2]


@pytest.mark.parametrize(
    "data",
    [{}, {"layers": {}}, {"layers": {"x": [1]}}, {"layers": {"0": []}}, {"layers": {"0": [1, -1]}}, {"layers": {"0": [True]}},
     {"layers": {"1": [1, 2], "01": [2, 1]}}],
)
def test_bad_profiles_are_refused(data: dict) -> None:
    with pytest.raises(UserError):
        parse_profile(data)

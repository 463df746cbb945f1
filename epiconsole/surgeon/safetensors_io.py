"""The safetensors file format, read and written without the safetensors library.

A file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (padded with spaces so the
data starts 8-byte aligned), then one contiguous data buffer. The JSON maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data buffer) and may
hold a ``"__metadata__"`` map of strings. Parsing it ourselves keeps ``inspect``/``drop``/``validate``
free of torch (whose import costs seconds), and lets ``drop`` copy byte ranges without decoding.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epiconsole.errors import UserError

#: Bytes per element for every dtype the format defines.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

#: numpy dtype names for the dtypes we write from numpy (bf16 is stored as raw uint16 bits).
NUMPY_DTYPES: dict[str, str] = {
    "float32": "F32",
    "float16": "F16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}

#: A header larger than this is certainly not safetensors (the library's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor inside a shard; ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along dimension 0 (a router row)."""
        inner = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        return inner * self.itemsize


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one safetensors file, tensors in file order."""

    path: Path
    size: int
    header_bytes: int  # 8 + N: where the data buffer starts
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str]

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def read_header(path: Path) -> ShardHeader:
    """Parse and check a safetensors header; a damaged file raises :class:`UserError` naming it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{path} is not a safetensors file (shorter than 8 bytes); re-download it.")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise UserError(
                    f"{path} is truncated or not a safetensors file (header claims {n} bytes, file has "
                    f"{size}); re-download it."
                )
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror or exc}; check the path and permissions.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} has a corrupt safetensors header (not JSON); re-download it.") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a corrupt safetensors header (not a JSON object); re-download it.")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name!r} has a malformed header entry; re-download the file.") from None
        if dtype not in DTYPE_SIZES:
            raise UserError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}.")
        if end - begin != math.prod(shape) * DTYPE_SIZES[dtype] or begin < 0:
            raise UserError(f"{path}: tensor {name!r} has offsets that do not match its shape and dtype.")
        tensors.append(TensorInfo(name, dtype, shape, data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.begin, t.end))
    # The format forbids holes and overlaps: every data byte belongs to exactly one tensor.
    pos = data_start
    for t in tensors:
        if t.begin != pos:
            raise UserError(f"{path}: tensor {t.name!r} leaves a hole or overlaps its neighbour; re-download it.")
        pos = t.end
    if pos != size:
        if pos > size:
            raise UserError(
                f"{path} is truncated: its header needs {pos} bytes but the file has {size}; "
                "re-download or re-copy it."
            )
        raise UserError(f"{path} has {size - pos} unexpected bytes after its last tensor; re-download it.")
    return ShardHeader(path, size, data_start, tuple(tensors), dict(metadata))


@dataclass(frozen=True)
class OutTensor:
    """A tensor to be written: name, dtype, shape; its bytes come from the caller's segment plan."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def encode_header(tensors: Iterable[OutTensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out back to back in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data buffer starts 8-byte aligned, as the reference writer does.
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_arrays(path: Path, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy arrays as safetensors (``("BF16", uint16_array)`` tuples store raw bf16 bits)."""
    import numpy as np

    items: list[tuple[OutTensor, Any]] = []
    for name, value in arrays.items():
        if isinstance(value, tuple):
            dtype, arr = value
        else:
            arr = value
            dtype = NUMPY_DTYPES[str(arr.dtype)]
        arr = np.ascontiguousarray(arr)
        items.append((OutTensor(name, dtype, tuple(arr.shape)), arr))
    with path.open("wb") as f:
        f.write(encode_header([t for t, _ in items], metadata))
        for _, arr in items:
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def read_array(path: Path, info: TensorInfo) -> Any:
    """One tensor as a numpy array (bf16 as its raw uint16 bits); reads only that tensor's bytes."""
    import numpy as np

    np_dtype = {
        "F32": "<f4",
        "F16": "<f2",
        "F64": "<f8",
        "BF16": "<u2",
        "I64": "<i8",
        "I32": "<i4",
        "I16": "<i2",
        "I8": "i1",
        "U8": "u1",
        "BOOL": "?",
        "U16": "<u2",
        "U32": "<u4",
        "U64": "<u8",
        "F8_E4M3": "u1",
        "F8_E5M2": "u1",
    }[info.dtype]
    with path.open("rb") as f:
        buf = os.pread(f.fileno(), info.nbytes, info.begin) if info.nbytes else b""
    if len(buf) != info.nbytes:
        raise UserError(f"{path} is truncated inside tensor {info.name!r}; re-download or re-copy it.")
    return np.frombuffer(buf, dtype=np_dtype).reshape(info.shape)


def float32_to_bf16_bits(arr: Any) -> Any:
    """Round-to-nearest-even float32 -> bfloat16, returned as uint16 bits (numpy has no bf16)."""
    import numpy as np

    u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def bf16_bits_to_float32(bits: Any) -> Any:
    import numpy as np

    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def count_nonfinite(arr: Any, dtype: str) -> int:
    """How many NaN/Inf values a tensor holds (0 for integer dtypes)."""
    import numpy as np

    if dtype == "BF16":
        # Exponent bits all ones means Inf or NaN; no float conversion needed.
        return int(np.count_nonzero((arr & np.uint16(0x7F80)) == np.uint16(0x7F80)))
    if dtype in ("F16", "F32", "F64"):
        return int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if dtype == "F8_E5M2":
        return int(np.count_nonzero((arr & np.uint8(0x7C)) == np.uint8(0x7C)))
    if dtype == "F8_E4M3":
        return int(np.count_nonzero((arr & np.uint8(0x7F)) == np.uint8(0x7F)))
    return 0

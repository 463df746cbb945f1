"""The simulated distributed-llama model file.

Real ``.m`` files are written by distributed-llama's ``convert-hf.py``. The simulated DGX's converter
writes a file with the same role: a header line naming what it was converted from (so the simulated
root node knows which configuration it serves), then filler bytes so sizes and hashes behave like a
real copy. It is never mistaken for a real model: the header says SIMULATED.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from epiconsole.sim.physics import Deployed

MAGIC = b"#SIMULATED-DLLAMA-MODEL v1 "


def write_model_file(path: str | os.PathLike[str], deployed: Deployed, size: int = 256 * 1024) -> Path:
    path = Path(path)
    header = MAGIC + json.dumps(asdict(deployed), sort_keys=True).encode() + b"\n"
    filler = bytes((i * 131 + len(header)) % 251 for i in range(max(0, size - len(header))))
    path.write_bytes(header + filler)
    return path


def read_model_file(path: str | os.PathLike[str]) -> Deployed:
    """The configuration a simulated model file was converted from; ValueError if it is not one."""
    with open(path, "rb") as f:
        line = f.readline(64 * 1024)
    if not line.startswith(MAGIC):
        raise ValueError(f"{path} is not a simulated dllama model file")
    return Deployed(**json.loads(line[len(MAGIC):]))

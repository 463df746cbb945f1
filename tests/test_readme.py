"""The README stays true: its config and plan examples load, its Quick start is two one-line commands,
and CI runs the test command verbatim."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from epiconsole import config, matrix

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README, re.S)


def test_every_toml_example_loads() -> None:
    blocks = toml_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        data = tomllib.loads(block)
        if set(data) == {"plan"} and ("experts" in data["plan"] or "models" in data["plan"]):
            plan = matrix.plan_from_dict(data, "README")
            assert plan.configurations
        else:
            config.loads(block, "README")


def test_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.startswith("    ")]
    assert len(commands) == 2
    assert commands[0].endswith("epiconsole") and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()

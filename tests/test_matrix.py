"""The plan as data: the paper's 25 configurations, custom TOML plans, the matrix command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from epiconsole import matrix
from epiconsole.errors import ConfigError

PAPER_IDS = ["baseline"] + [f"drop{n}_{t}" for n in range(1, 9) for t in ("all", "early", "late")]


def test_default_plan_is_the_papers_matrix() -> None:
    plan = matrix.builtin("pruning")
    assert plan.ids() == PAPER_IDS
    assert [c.order for c in plan.configurations] == list(range(25))
    assert plan.repetitions == 3 and len(plan.trials()) == 75
    assert plan.get("baseline").stages == ("convert", "deploy", "stabilize", "benchmark", "calculate", "log")
    assert plan.get("drop4_all").strategy == "remove"
    assert plan.get("drop4_late").strategy == "zero"


def test_early_and_late_are_quarters_of_the_layers() -> None:
    plan = matrix.builtin("pruning")
    assert plan.target_layers("early") == list(range(12))
    assert plan.target_layers("late") == list(range(36, 48))


def test_baseline_study_skips_surgery() -> None:
    plan = matrix.builtin("baseline-study")
    assert [c.model for c in plan.configurations] == [m for _, m in matrix.BASELINE_STUDY_MODELS]
    assert all("surgery" not in c.stages and "validate" not in c.stages for c in plan.configurations)


def test_custom_plan(tmp_path: Path) -> None:
    p = tmp_path / "deep.toml"
    p.write_text(
        '[plan]\nname = "deep"\nmodel = "Mixtral-8x7B"\nrepetitions = 5\nexperts = [2, 4]\n'
        'targets = ["all", "late"]\nstrategy = { late = "mask" }\n'
        '[[plan.models]]\nid = "dense_ref"\nmodel = "Mistral-7B-v0.3"\n'
    )
    plan = matrix.load_plan(p)
    assert plan.ids() == ["baseline", "drop2_all", "drop2_late", "drop4_all", "drop4_late", "dense_ref"]
    assert plan.repetitions == 5
    assert plan.get("drop4_late").strategy == "mask"
    assert not plan.get("dense_ref").modified


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[plan]\nexperts = [0]', "plan.experts"),
        ('[plan]\nexperts = [1]\ntargets = ["middle"]', "plan.targets"),
        ('[plan]\nexperts = [1]\nstrategy = { early = "remove" }', "plan.strategy.early"),
        ('[plan]\nrepetitions = 0\nexperts = [1]', "plan.repetitions"),
        ('[plan]\nbogus = 1', "plan.bogus"),
        ('[plan]\nbaseline = false', "plan"),
        ('[[plan.configuration]]\nid = ".."', "plan.configuration.id"),
    ],
)
def test_bad_plans(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        matrix.load_plan(p)


def test_only_and_reps() -> None:
    plan = matrix.builtin("pruning").only(["drop2_late", "baseline"]).with_repetitions(1)
    assert plan.ids() == ["baseline", "drop2_late"]
    assert len(plan.trials()) == 2
    with pytest.raises(ConfigError, match="unknown configuration"):
        plan.only(["drop9_all"])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "epiconsole", *args], capture_output=True, text=True, timeout=60)


def test_matrix_command_json() -> None:
    proc = run_cli("matrix", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [c["id"] for c in data["configurations"]] == PAPER_IDS
    assert data["repetitions"] == 3


def test_matrix_command_with_custom_plan_in_config(tmp_path: Path) -> None:
    plan = tmp_path / "p.toml"
    plan.write_text('[plan]\nexperts = [3]\ntargets = ["early"]\nrepetitions = 2\n')
    cfg = tmp_path / "lab.toml"
    cfg.write_text(f'[plan]\nfile = "{plan}"\n')
    data = json.loads(run_cli("matrix", "--json", "--config", str(cfg)).stdout)
    assert [c["id"] for c in data["configurations"]] == ["baseline", "drop3_early"]
    assert data["repetitions"] == 2

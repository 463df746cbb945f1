"""Layering: the headless path never imports Textual, torch, transformers or lm_eval; drivers import
nothing from the core or the screens."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("textual", "torch", "transformers", "lm_eval", "safetensors")


def modules_after(code: str) -> set[str]:
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    import json

    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def heavy_in(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in HEAVY)


def test_import_epiconsole_is_light() -> None:
    assert heavy_in(modules_after("import epiconsole, epiconsole.cli, epiconsole.config, epiconsole.matrix")) == []


def test_matrix_command_is_light() -> None:
    code = (
        "import contextlib, io\nfrom epiconsole.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['matrix', '--json']) == 0\n"
    )
    assert heavy_in(modules_after(code)) == []


def test_help_imports_every_command_module_without_heavy_deps() -> None:
    code = "from epiconsole.cli import build_parser\nbuild_parser()"
    assert heavy_in(modules_after(code)) == []


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_drivers_import_nothing_from_core_or_screens() -> None:
    for path in (ROOT / "drivers").rglob("*.py"):
        bad = _imports(path) & {"epiconsole", "screens", "themes", "textual"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_core_never_imports_screens() -> None:
    allowed = {ROOT / "epiconsole" / "commands" / "tui.py", ROOT / "epiconsole" / "commands" / "serve.py"}
    for path in (ROOT / "epiconsole").rglob("*.py"):
        if path in allowed:
            continue
        bad = _imports(path) & {"screens", "textual", "themes"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad} (only the TUI entry points may)"

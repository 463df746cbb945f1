"""Console themes: palettes as data, semantic lab colours defined once, user themes from TOML.

Every theme carries the same semantic variables, used by the TCSS (``$node-ok``) and by the charts
(:func:`series_colors`), so a theme switch recolours tiles and plots alike:

``node-ok`` / ``node-warn`` / ``node-fault``  a node's health
``node-0`` .. ``node-3``                      one series colour per node (tiles, sparklines, traces)
``badge-sim``                                 the SIMULATED badge
``stage-run`` / ``stage-done`` / ``stage-bad`` / ``stage-idle``   matrix badges

User themes: ``<config dir>/themes/*.toml`` with the keys of :data:`BUILTIN` entries (``name``,
``dark``, Textual colours ``primary`` ... ``panel``, and a ``[variables]`` table for the semantic
colours). Missing semantic colours fall back to the dark default's, so a user theme may set only a few.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from textual.color import Color, ColorParseError
from textual.theme import Theme

from epiconsole.errors import ConfigError

SEMANTIC = (
    "node-ok", "node-warn", "node-fault", "node-0", "node-1", "node-2", "node-3",
    "badge-sim", "stage-run", "stage-done", "stage-bad", "stage-idle",
)

#: Built-in palettes. ``epi-dark`` is the panel's default; ``epi-daylight`` is high contrast for a
#: bright lab (dark text on white, saturated series colours that stay apart in daylight).
BUILTIN: dict[str, dict[str, Any]] = {
    "epi-dark": {
        "dark": True,
        "primary": "#4FC3F7",
        "secondary": "#81C784",
        "accent": "#FFB74D",
        "warning": "#FFB300",
        "error": "#FF5252",
        "success": "#66BB6A",
        "foreground": "#E6EDF3",
        "background": "#0D1117",
        "surface": "#161B22",
        "panel": "#1F2630",
        "variables": {
            "node-ok": "#66BB6A",
            "node-warn": "#FFB300",
            "node-fault": "#FF5252",
            "node-0": "#4FC3F7",
            "node-1": "#F48FB1",
            "node-2": "#AED581",
            "node-3": "#FFD54F",
            "badge-sim": "#FF9800",
            "stage-run": "#4FC3F7",
            "stage-done": "#66BB6A",
            "stage-bad": "#FF5252",
            "stage-idle": "#6E7681",
            "footer-key-foreground": "#4FC3F7",
        },
    },
    "epi-daylight": {
        "dark": False,
        "primary": "#0B4F9C",
        "secondary": "#1B6E20",
        "accent": "#A64B00",
        "warning": "#8A5A00",
        "error": "#B00020",
        "success": "#1B6E20",
        "foreground": "#000000",
        "background": "#FFFFFF",
        "surface": "#F2F2F2",
        "panel": "#E0E0E0",
        "variables": {
            "node-ok": "#1B6E20",
            "node-warn": "#8A5A00",
            "node-fault": "#B00020",
            "node-0": "#0B4F9C",
            "node-1": "#A0006E",
            "node-2": "#1B6E20",
            "node-3": "#A64B00",
            "badge-sim": "#C43E00",
            "stage-run": "#0B4F9C",
            "stage-done": "#1B6E20",
            "stage-bad": "#B00020",
            "stage-idle": "#555555",
            "footer-key-foreground": "#0B4F9C",
        },
    },
}

DEFAULT_THEME = "epi-dark"
_COLOR_KEYS = ("primary", "secondary", "accent", "warning", "error", "success", "foreground", "background",
               "surface", "panel", "boost")


def build_theme(name: str, data: Mapping[str, Any], source: str = "<builtin>") -> Theme:
    """A Textual :class:`Theme` from palette data; semantic colours default to ``epi-dark``'s."""
    variables = dict(BUILTIN[DEFAULT_THEME]["variables"])
    extra = data.get("variables", {})
    if not isinstance(extra, Mapping):
        raise ConfigError(source, "variables", "expected a table of colour names to colours")
    variables.update({str(k): str(v) for k, v in extra.items()})
    colours: dict[str, str] = {}
    for key in _COLOR_KEYS:
        if key in data:
            colours[key] = str(data[key])
    for key, value in {**colours, **variables}.items():
        try:
            Color.parse(value)
        except ColorParseError:
            raise ConfigError(source, key, f"expected a colour such as '#4FC3F7', got {value!r}") from None
    if "primary" not in colours:
        raise ConfigError(source, "primary", "missing; a theme needs at least a primary colour")
    unknown = set(data) - set(_COLOR_KEYS) - {"name", "dark", "variables"}
    if unknown:
        raise ConfigError(source, sorted(unknown)[0], f"unknown key; expected name, dark, {', '.join(_COLOR_KEYS)}, variables")
    return Theme(name=name, dark=bool(data.get("dark", True)), variables=variables, **colours)


def builtin_themes() -> list[Theme]:
    return [build_theme(name, data) for name, data in BUILTIN.items()]


def load_user_themes(directory: str | Path) -> list[Theme]:
    """Themes from ``directory/*.toml`` (the file name is the theme name unless ``name`` is set)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        return []
    out = []
    for path in sorted(d.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(str(path), "(file)", f"not a readable TOML theme: {exc}") from None
        out.append(build_theme(str(data.get("name", path.stem)), data, str(path)))
    return out


def series_colors(variables: Mapping[str, str], count: int = 4) -> list[tuple[int, int, int]]:
    """RGB of the per-node series colours (for plotext, which takes RGB tuples)."""
    fallback = BUILTIN[DEFAULT_THEME]["variables"]
    out = []
    for i in range(count):
        key = f"node-{i % 4}"
        out.append(Color.parse(variables.get(key, fallback[key])).rgb)
    return out


def color(variables: Mapping[str, str], name: str) -> tuple[int, int, int]:
    return Color.parse(variables.get(name, BUILTIN[DEFAULT_THEME]["variables"].get(name, "#888888"))).rgb


BASE_TCSS = Path(__file__).with_name("base.tcss")

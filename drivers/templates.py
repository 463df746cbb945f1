"""Command templates: ``{name}`` placeholders filled with shell-quoted values.

The one definition of the quoting rule, used by the drivers and by the lab config (which checks
templates at load time). No dependencies, so importing it is free.
"""

from __future__ import annotations

import shlex
import string
from typing import Any


def placeholders(template: str) -> set[str]:
    """The placeholder names a template uses."""
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def _word(value: Any) -> str:
    text = str(value)
    if "\x00" in text:
        # sshd and every shell cut a command line at a NUL byte, which would leave a quote open mid-value.
        raise ValueError(f"a template value may not contain a NUL byte: {text!r}")
    return shlex.quote(text)


def quote_value(value: Any) -> str:
    """One shell word per value; a list or tuple becomes several quoted words."""
    if isinstance(value, list | tuple):
        return " ".join(_word(v) for v in value)
    return _word(value)


def fill(template: str, **values: Any) -> str:
    """Fill ``{name}`` placeholders with shell-quoted values, so ``x; rm -rf ~`` stays one literal word."""
    parts: list[str] = []
    for literal, name, spec, conv in string.Formatter().parse(template):
        parts.append(literal)
        if name is None:
            continue
        if spec or conv:
            raise ValueError(f"placeholder {{{name}}} may not carry a format spec or conversion")
        if name not in values:
            raise KeyError(f"template needs a value for {{{name}}}")
        parts.append(quote_value(values[name]))
    return "".join(parts)

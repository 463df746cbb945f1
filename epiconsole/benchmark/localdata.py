"""Our small local task files (``tasks/data/*.jsonl``): where they are and what their answers are.

Three task families, a few dozen original items each, in the same record formats as the public datasets
(cais/mmlu, allenai/ai2_arc, Rowan/hellaswag). lm-eval reads them through our task YAMLs; the simulated
dllama-api reads them here to know the right answer to an item it is shown. Importing this module never
imports lm_eval.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TASKS_DIR = Path(__file__).with_name("tasks")
DATA_DIR = TASKS_DIR / "data"

#: Our local task -> (family it stands in for, data files with the scored items).
LOCAL_TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "epi_mmlu_local": ("mmlu", ("mmlu_local.test.jsonl", "mmlu_local.dev.jsonl")),
    "epi_arc_local": ("arc_challenge", ("arc_local.test.jsonl", "arc_local.train.jsonl")),
    "epi_hellaswag_local": ("hellaswag", ("hellaswag_local.validation.jsonl", "hellaswag_local.train.jsonl")),
}

LETTERS = "ABCDE"


@dataclass(frozen=True)
class LocalItem:
    task: str
    family: str
    question: str
    options: tuple[str, ...]
    answer: str  # the gold letter


def normalize(text: str) -> str:
    """Case- and whitespace-insensitive form used to match an item's options in a rendered prompt."""
    return re.sub(r"\s+", " ", text).strip().lower()


def options_key(options: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(normalize(o) for o in options)


def _records(name: str) -> Iterator[dict]:
    with open(DATA_DIR / name, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def items(task: str) -> list[LocalItem]:
    """All items (scored and few-shot) of one local task."""
    family, files = LOCAL_TASKS[task]
    out: list[LocalItem] = []
    for name in files:
        for r in _records(name):
            if family == "mmlu":
                out.append(LocalItem(task, family, r["question"], tuple(r["choices"]), LETTERS[int(r["answer"])]))
            elif family == "arc_challenge":
                labels = list(r["choices"]["label"])
                out.append(LocalItem(task, family, r["question"], tuple(r["choices"]["text"]),
                                     LETTERS[labels.index(r["answerKey"])]))
            else:
                ctx = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"
                out.append(LocalItem(task, family, ctx, tuple(r["endings"]), LETTERS[int(r["label"])]))
    return out


@functools.cache
def answer_key() -> dict[tuple[str, ...], LocalItem]:
    """Normalized option texts -> item, over every local task (option sets are unique across them)."""
    key: dict[tuple[str, ...], LocalItem] = {}
    for task in LOCAL_TASKS:
        for item in items(task):
            key[options_key(item.options)] = item
    return key


__all__ = ["DATA_DIR", "LOCAL_TASKS", "TASKS_DIR", "LocalItem", "answer_key", "items", "normalize", "options_key"]

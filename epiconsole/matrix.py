"""The experiment plan as data: configurations x repetitions, run in a fixed order.

Two plans are built in:

* ``pruning`` — the paper's 25 configurations of Qwen3-30B-A3B: ``baseline`` then ``drop{n}_{target}``
  for n = 1..8 experts and target in (all, early, late), in that order (run order 0..24), 3 repetitions.
* ``baseline-study`` — five unmodified models (no surgery stages), 3 repetitions each.

Custom plans are TOML files (see README, "Custom plans"). A plan is pure data: the engine walks it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from epiconsole.errors import ConfigError

Target = Literal["all", "early", "late"]
Strategy = Literal["remove", "mask", "zero"]
TARGETS: tuple[Target, ...] = ("all", "early", "late")

#: Stages a configuration goes through once (the model is built and deployed) ...
CONFIG_STAGES = ("surgery", "validate", "convert", "deploy")
#: ... and stages each repetition goes through.
REP_STAGES = ("stabilize", "benchmark", "calculate", "log")
STAGES = CONFIG_STAGES + REP_STAGES

#: ``remove`` is physical and uniform (every runtime loads it) so it is the default for ``all``.
#: Per-layer drops cannot be removed physically (no runtime loads per-layer expert counts) and
#: distributed-llama has no run-time router mask, so early/late default to ``zero`` — what the
#: published "pruning breaks the model" experiments did. The strategy is recorded with every result.
DEFAULT_STRATEGY: dict[str, Strategy] = {"all": "remove", "early": "zero", "late": "zero"}

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # never "." or "..": ids name export folders


@dataclass(frozen=True)
class Configuration:
    id: str
    order: int
    model: str
    #: Experts dropped per targeted layer (0 for an unmodified model).
    experts: int = 0
    target: Target | None = None
    strategy: Strategy | None = None
    #: Where the unmodified model lives (for plans of unmodified models); empty: the surgery source.
    source: str = ""

    @property
    def modified(self) -> bool:
        return self.experts > 0

    @property
    def stages(self) -> tuple[str, ...]:
        """Stages that apply: unmodified models skip surgery and validation."""
        skip = () if self.modified else ("surgery", "validate")
        return tuple(s for s in STAGES if s not in skip)

    @property
    def label(self) -> str:
        if not self.modified:
            return self.model if self.id != "baseline" else "baseline"
        return f"-{self.experts} experts, {self.target} layers"


@dataclass(frozen=True)
class Plan:
    name: str
    description: str
    repetitions: int
    configurations: tuple[Configuration, ...]
    #: Layers of the model (to say which layers early/late mean); 0 when unknown.
    layers: int = 0
    early_fraction: float = 0.25
    source: str = field(default="", compare=False)

    def ids(self) -> list[str]:
        return [c.id for c in self.configurations]

    def get(self, config_id: str) -> Configuration:
        for c in self.configurations:
            if c.id == config_id:
                return c
        raise KeyError(config_id)

    def only(self, ids: list[str]) -> Plan:
        """The plan restricted to ``ids`` (order kept as in the plan); unknown ids are a usage error."""
        unknown = [i for i in ids if i not in self.ids()]
        if unknown:
            raise ConfigError(self.source or self.name, "--only", f"unknown configuration {unknown[0]!r}; see `epiconsole matrix`")
        keep = set(ids)
        return replace(self, configurations=tuple(c for c in self.configurations if c.id in keep))

    def with_repetitions(self, n: int) -> Plan:
        if n < 1:
            raise ConfigError(self.source or self.name, "--reps", "expected a positive number of repetitions")
        return replace(self, repetitions=n)

    def trials(self) -> list[tuple[Configuration, int]]:
        """Every (configuration, repetition) in run order; repetitions count from 1."""
        return [(c, r) for c in self.configurations for r in range(1, self.repetitions + 1)]

    def target_layers(self, target: Target) -> list[int]:
        """Layer indices a target means for this plan's model (first/last 25% by default)."""
        if not self.layers:
            return []
        k = max(1, round(self.layers * self.early_fraction))
        if target == "all":
            return list(range(self.layers))
        if target == "early":
            return list(range(k))
        return list(range(self.layers - k, self.layers))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        d["trials"] = len(self.configurations) * self.repetitions
        return d


def pruning_plan(
    model: str = "Qwen3-30B-A3B",
    depths: range | list[int] = range(1, 9),
    targets: tuple[Target, ...] = TARGETS,
    repetitions: int = 3,
    layers: int = 48,
    strategy: dict[str, Strategy] | None = None,
    name: str = "pruning",
) -> Plan:
    """Baseline plus ``drop{n}_{target}`` for each depth and target, in the paper's order."""
    strategy = {**DEFAULT_STRATEGY, **(strategy or {})}
    configs = [Configuration(id="baseline", order=0, model=model)]
    for n in depths:
        for t in targets:
            configs.append(
                Configuration(id=f"drop{n}_{t}", order=len(configs), model=model, experts=n, target=t, strategy=strategy[t])
            )
    return Plan(
        name=name,
        description=f"{model}: baseline + {len(list(depths))} depths x {'/'.join(targets)} expert removal",
        repetitions=repetitions,
        configurations=tuple(configs),
        layers=layers,
    )


BASELINE_STUDY_MODELS = (
    ("qwen3_30b_a3b", "Qwen3-30B-A3B"),
    ("llama31_8b", "Llama-3.1-8B"),
    ("mistral7b_v03", "Mistral-7B-v0.3"),
    ("phi3_mini_4k", "Phi-3-mini-4k"),
    ("gemma2_9b", "Gemma-2-9B"),
)


def baseline_study_plan(repetitions: int = 3) -> Plan:
    configs = tuple(Configuration(id=i, order=k, model=m) for k, (i, m) in enumerate(BASELINE_STUDY_MODELS))
    return Plan(
        name="baseline-study",
        description="EPI of five unmodified models (no surgery)",
        repetitions=repetitions,
        configurations=configs,
    )


BUILTIN = {"pruning": pruning_plan, "baseline-study": baseline_study_plan}


def builtin(name: str) -> Plan:
    try:
        return BUILTIN[name]()
    except KeyError:
        raise ConfigError("", "plan.builtin", f"unknown plan {name!r}; expected one of: {', '.join(BUILTIN)}") from None


def load_plan(path: str | Path) -> Plan:
    """Load a TOML plan file (format in README, "Custom plans")."""
    path = Path(path).expanduser()
    src = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(src, "(file)", f"cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(src, "(syntax)", f"not valid TOML: {exc}") from None
    return plan_from_dict(data, src)


_PLAN_KEYS = {"name", "description", "model", "repetitions", "layers", "early_fraction", "baseline",
              "experts", "targets", "strategy", "models", "configuration"}


def plan_from_dict(data: dict[str, Any], src: str = "<plan>") -> Plan:
    plan = data.get("plan", data)
    for k in plan:
        if k not in _PLAN_KEYS:
            raise ConfigError(src, f"plan.{k}", f"unknown key; expected one of: {', '.join(sorted(_PLAN_KEYS))}")

    def get(key: str, typ: type | tuple[type, ...], default: Any) -> Any:
        v = plan.get(key, default)
        if v is not default and (not isinstance(v, typ) or isinstance(v, bool) and typ is not bool):
            raise ConfigError(src, f"plan.{key}", f"expected {_describe(typ)}, got {v!r}")
        return v

    name = get("name", str, Path(src).stem)
    model = get("model", str, "Qwen3-30B-A3B")
    reps = get("repetitions", int, 3)
    if reps < 1:
        raise ConfigError(src, "plan.repetitions", "expected a positive integer")
    layers = get("layers", int, 0)
    early = get("early_fraction", (int, float), 0.25)
    if not 0 < early <= 0.5:
        raise ConfigError(src, "plan.early_fraction", "expected a fraction in (0, 0.5]")
    strategy = get("strategy", dict, {})
    for t, s in strategy.items():
        if t not in TARGETS or s not in ("remove", "mask", "zero"):
            raise ConfigError(src, f"plan.strategy.{t}", "expected target all/early/late = remove/mask/zero")
        if s == "remove" and t != "all":
            raise ConfigError(src, f"plan.strategy.{t}", "remove is uniform only; use mask or zero for per-layer drops")
    strategy = {**DEFAULT_STRATEGY, **strategy}

    configs: list[Configuration] = []

    def add(c: Configuration) -> None:
        if not _ID_RE.match(c.id):
            raise ConfigError(src, "plan.configuration.id", f"{c.id!r}: use letters, digits, _ . -")
        if any(x.id == c.id for x in configs):
            raise ConfigError(src, "plan.configuration.id", f"{c.id!r} appears twice")
        configs.append(replace(c, order=len(configs)))

    if get("baseline", bool, "experts" in plan):
        add(Configuration(id="baseline", order=0, model=model))
    depths = get("experts", list, [])
    targets = get("targets", list, list(TARGETS))
    for t in targets:
        if t not in TARGETS:
            raise ConfigError(src, "plan.targets", f"unknown target {t!r}; expected all, early or late")
    for n in depths:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(src, "plan.experts", f"expected positive integers, got {n!r}")
        for t in targets:
            add(Configuration(id=f"drop{n}_{t}", order=0, model=model, experts=n, target=t, strategy=strategy[t]))
    for i, m in enumerate(get("models", list, [])):
        if not isinstance(m, dict) or not isinstance(m.get("id"), str) or not isinstance(m.get("model", ""), str):
            raise ConfigError(src, f"plan.models[{i}]", "expected a table with id (and model, source)")
        add(Configuration(id=m["id"], order=0, model=m.get("model", m["id"]), source=str(m.get("source", ""))))
    for i, c in enumerate(get("configuration", list, [])):
        key = f"plan.configuration[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("id"), str):
            raise ConfigError(src, key, "expected a table with at least id")
        n = c.get("experts", 0)
        t = c.get("target")
        if not isinstance(n, int) or n < 0:
            raise ConfigError(src, f"{key}.experts", "expected a non-negative integer")
        if n and t not in TARGETS:
            raise ConfigError(src, f"{key}.target", "expected all, early or late")
        s = c.get("strategy", strategy[t] if n else None)
        if n and (s not in ("remove", "mask", "zero") or (s == "remove" and t != "all")):
            raise ConfigError(src, f"{key}.strategy", "expected remove (all layers only), mask or zero")
        add(Configuration(id=c["id"], order=0, model=c.get("model", model), experts=n,
                          target=t if n else None, strategy=s if n else None, source=str(c.get("source", ""))))
    if not configs:
        raise ConfigError(src, "plan", "no configurations; give experts = [...], models or [[plan.configuration]]")
    return Plan(
        name=name,
        description=get("description", str, f"custom plan from {Path(src).name}"),
        repetitions=reps,
        configurations=tuple(configs),
        layers=layers,
        early_fraction=float(early),
        source=src,
    )


def _describe(typ: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array", dict: "a table"}
    if isinstance(typ, tuple):
        return " or ".join(names[t] for t in typ)
    return names[typ]


def plan_for(cfg: Any) -> Plan:
    """The plan a lab config selects (``[plan] file`` or ``builtin``, with its repetitions override)."""
    plan = load_plan(cfg.plan.file) if cfg.plan.file else builtin(cfg.plan.builtin)
    if cfg.plan.repetitions:
        plan = plan.with_repetitions(cfg.plan.repetitions)
    return plan

"""The lab configuration: one TOML file, mapped onto frozen dataclasses.

Found by ``--config``, then ``$EPICONSOLE_CONFIG``, then ``<XDG config dir>/epiconsole/lab.toml``; with
none of them, the simulated lab's defaults. Every mistake (bad TOML, unknown key, wrong type, missing
host, unknown placeholder in a command template) raises :class:`ConfigError`, whose message is one line
naming the file, the key and what is expected.

Command templates use ``{name}`` placeholders. :func:`fill` shell-quotes every value it puts in, so a
value such as ``x; rm -rf ~`` reaches the remote shell as one literal argument. A list value becomes
several quoted words.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from drivers.templates import fill, placeholders, quote_value  # noqa: F401  (part of this module's API)
from epiconsole.errors import ConfigError

ENV_VAR = "EPICONSOLE_CONFIG"
APP_NAME = "epiconsole"
NODES = ("pi0", "pi1", "pi2", "pi3")


# --------------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class LabSection:
    name: str = "simulated lab"
    #: True only for the embedded simulated lab; every screen and export labels its data simulated.
    simulated: bool = False
    #: SQLite ledger path; empty means the XDG data dir (a separate file for the simulated lab).
    ledger: str = ""


@dataclass(frozen=True)
class MeterConfig:
    port: str = "/dev/ttyACM0"
    baud: int = 115200
    #: Sample rate asked of the board (1-50 Hz).
    rate_hz: float = 10.0
    #: Channel id (as a string key, TOML keys are strings) -> node name.
    channels: dict[str, str] = field(default_factory=lambda: {str(i): n for i, n in enumerate(NODES)})
    #: Seconds without a sample after which the meter counts as silent (a suspender condition).
    silent_after_s: float = 2.0
    #: Longest wait between reconnect attempts after the port disappeared.
    reconnect_max_s: float = 5.0


@dataclass(frozen=True)
class HostConfig:
    address: str
    port: int = 22
    user: str = "pi"
    #: Private key file; empty means the SSH agent and the default keys. Passwords are never read from config.
    key: str = ""
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 120.0
    keepalive_s: float = 15.0


@dataclass(frozen=True)
class ClusterConfig:
    nodes: tuple[str, ...] = NODES
    root: str = "pi0"
    #: Host name of the root node's API as seen from the orchestrator; empty means the root's SSH address.
    api_host: str = ""
    api_port: int = 9990
    worker_port: int = 9998
    nthreads: int = 4
    #: Directory on the root node that receives deployed models.
    model_dir: str = "/home/pi/models"
    #: Host whose ``ambient`` command reads the room temperature (a DS18B20 on the root Pi by default).
    ambient_host: str = "pi0"
    api_timeout_s: float = 600.0
    api_ready_timeout_s: float = 600.0


@dataclass(frozen=True)
class CommandsConfig:
    """Shell templates run over SSH. Placeholders are filled shell-quoted by :func:`fill`."""

    surgery: str = (
        "epiconsole surgeon drop {source} --experts {experts} --layers {layers} --strategy {strategy}"
        " --profile {profile} --out {out} --json"
    )
    validate: str = "epiconsole surgeon validate {out} --json"
    #: distributed-llama's converters write dllama_model_{name}_q40.m and dllama_tokenizer_{name}.t into {out}.
    convert: str = "cd {out} && python3 {converter} . q40 {name} && python3 {tokenizer_converter} . {name}"
    #: Runs on the DGX: copies the converted model to the root node.
    push: str = "rsync -a --partial {files} {dest}"
    hash: str = "sha256sum {path}"
    size: str = "stat -c %s {path}"
    start_worker: str = (
        "setsid nohup dllama worker --port {port} --nthreads {nthreads} > /tmp/dllama-worker.log 2>&1 < /dev/null &"
    )
    #: The bracket keeps pkill from matching the remote shell that runs this very command line.
    stop_worker: str = "pkill -f '[d]llama worker' || true"
    start_root: str = (
        "setsid nohup dllama-api --port {port} --model {model} --tokenizer {tokenizer} --buffer-float-type q80"
        " --nthreads {nthreads} --workers {workers} > /tmp/dllama-api.log 2>&1 < /dev/null &"
    )
    stop_root: str = "pkill -f '[d]llama-api' || true"
    health: str = (
        "vcgencmd measure_temp; vcgencmd get_throttled; vcgencmd measure_clock arm;"
        " cat /sys/devices/system/cpu/cpufreq/policy0/scaling_governor; cat /proc/loadavg"
    )
    set_governor: str = "echo {governor} | sudo tee /sys/devices/system/cpu/cpufreq/policy*/scaling_governor"
    ambient: str = "cat /sys/bus/w1/devices/28-*/temperature"
    provenance: str = "uname -r; dllama --version 2>/dev/null || true"


#: The placeholders each template may use; anything else is a config error caught at load time.
TEMPLATE_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "surgery": frozenset({"source", "experts", "layers", "strategy", "profile", "out"}),
    "validate": frozenset({"out"}),
    "convert": frozenset({"out", "converter", "tokenizer_converter", "name"}),
    "push": frozenset({"files", "dest"}),
    "hash": frozenset({"path"}),
    "size": frozenset({"path"}),
    "start_worker": frozenset({"port", "nthreads"}),
    "stop_worker": frozenset(),
    "start_root": frozenset({"port", "model", "tokenizer", "nthreads", "workers"}),
    "stop_root": frozenset(),
    "health": frozenset(),
    "set_governor": frozenset({"governor"}),
    "ambient": frozenset(),
    "provenance": frozenset(),
}


@dataclass(frozen=True)
class SurgeryConfig:
    """Where the DGX keeps the source model, the router profile and the surgery outputs."""

    model: str = "Qwen3-30B-A3B"
    source: str = "/data/models/Qwen3-30B-A3B"
    profile: str = "/data/profiles/Qwen3-30B-A3B.json"
    work_dir: str = "/data/epi"
    #: remove (uniform, physical), mask (-inf router logit at run time) or zero (weights and router row zeroed).
    strategy: Literal["remove", "mask", "zero"] = "remove"
    converter: str = "/opt/distributed-llama/converter/convert-hf.py"
    tokenizer_converter: str = "/opt/distributed-llama/converter/convert-tokenizer-hf.py"


@dataclass(frozen=True)
class TaskConfig:
    name: str
    shots: int = 0
    metric: str = "acc"
    weight: float = 1.0


@dataclass(frozen=True)
class BenchmarkConfig:
    tasks: tuple[TaskConfig, ...] = (
        TaskConfig("mmlu", shots=5),
        TaskConfig("arc_challenge", shots=25),
        TaskConfig("hellaswag", shots=10),
    )
    #: Items per task for quick runs; 0 means the whole task.
    limit: int = 0
    #: lm-eval model: ``dllama-chat`` (ours, generative, chat-completions) or ``local-completions`` (logprobs).
    model: str = "dllama-chat"
    seed: int = 1234
    max_tokens: int = 16
    retries: int = 3
    #: Extra directory of lm-eval task YAMLs (ours ship with the package).
    task_dir: str = ""


@dataclass(frozen=True)
class Thresholds:
    stabilize_min_s: float = 60.0
    stabilize_window_s: float = 20.0
    #: Max (max - min) of a node's power over the stabilize window, in watts.
    stabilize_spread_w: float = 0.5
    gap_limit_s: float = 1.0
    coverage_min: float = 0.99
    ambient_c: float = 22.0
    ambient_tol_c: float = 2.0
    node_temp_max_c: float = 80.0
    #: Accuracy-optimal depth: deepest prune whose accuracy stays within this many points of baseline.
    accuracy_tolerance_pts: float = 1.0
    #: Which tokens divide the energy: all processed, prompt only, or generated only.
    token_denominator: Literal["all", "prompt", "completion"] = "all"
    #: A tripped suspender resumes once the condition has held good this long.
    suspender_settle_s: float = 30.0
    #: Throttling during a window: mark the repetition invalid, or redo it.
    on_throttle: Literal["invalid", "redo"] = "invalid"
    #: Meter samples outside runs are kept this many hours (0 keeps them forever).
    retention_h: float = 24.0


@dataclass(frozen=True)
class PlanConfig:
    #: A built-in plan (``pruning`` or ``baseline-study``) unless ``file`` names a TOML plan.
    builtin: str = "pruning"
    file: str = ""
    #: Overrides the plan's repetitions when non-zero.
    repetitions: int = 0


@dataclass(frozen=True)
class SimFaults:
    """Fault switches of the simulated lab (all off by default)."""

    garbage_fraction: float = 0.0
    lost_line_fraction: float = 0.0
    meter_unplug_at_s: float = -1.0
    meter_unplug_for_s: float = 3.0
    meter_reboot_at_s: float = -1.0
    node_down: str = ""
    node_throttled: str = ""
    hot_ambient: bool = False
    api_fail_fraction: float = 0.0
    api_delay_s: float = 0.0


@dataclass(frozen=True)
class SimConfig:
    seed: int = 42
    #: Simulated seconds per real second: waits (stabilize, benchmark duration) shrink by this factor.
    time_scale: float = 60.0
    #: Register quantization of the simulated ATM90E26 (1 W steps) on the W field.
    quantize_w: bool = False
    faults: SimFaults = field(default_factory=SimFaults)


@dataclass(frozen=True)
class NotifyConfig:
    #: Run on campaign finished/failed/suspended/resumed, with the event as JSON on stdin.
    command: str = ""
    timeout_s: float = 30.0


@dataclass(frozen=True)
class UiConfig:
    theme: str = "epi-dark"
    #: Action id -> key, e.g. ``{ dashboard = "F1" }``.
    keys: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    #: View-only unless set: a browser viewer may not start, pause or abort runs.
    allow_control: bool = False


def _default_hosts() -> dict[str, HostConfig]:
    hosts = {"dgx": HostConfig(address="dgx.local", user="lab")}
    hosts.update({n: HostConfig(address=f"{n}.local") for n in NODES})
    return hosts


@dataclass(frozen=True)
class LabConfig:
    lab: LabSection = field(default_factory=LabSection)
    meter: MeterConfig = field(default_factory=MeterConfig)
    hosts: dict[str, HostConfig] = field(default_factory=_default_hosts)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    thresholds: Thresholds = field(default_factory=Thresholds)
    plan: PlanConfig = field(default_factory=PlanConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    web: WebConfig = field(default_factory=WebConfig)
    #: Where this config came from ("" for built-in defaults). Not a TOML key.
    source: str = field(default="", compare=False, metadata={"toml": False})

    @property
    def simulated(self) -> bool:
        return self.lab.simulated

    def node_for_channel(self, channel: int) -> str | None:
        return self.meter.channels.get(str(channel))

    def ledger_path(self) -> Path:
        if self.lab.ledger:
            return Path(self.lab.ledger).expanduser()
        name = "sim-ledger.sqlite" if self.simulated else "ledger.sqlite"
        return data_dir() / name

    def digest(self) -> str:
        """A stable hash of the effective configuration, recorded with every trial."""
        blob = json.dumps(to_dict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def template(self, template: str, /) -> str:
        return getattr(self.commands, template)

    def command(self, template: str, /, **values: Any) -> str:
        """The named command template filled with shell-quoted values."""
        return fill(self.template(template), **values)


# --------------------------------------------------------------------------------------------------
# Templates


# --------------------------------------------------------------------------------------------------
# Paths


def config_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir(APP_NAME))


def data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME))


def find_config(explicit: str | None = None) -> Path | None:
    """The config file to use: ``--config``, ``$EPICONSOLE_CONFIG``, the XDG config dir, else None."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(str(path), "--config", "no such file; give the path of a lab config (TOML)")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(str(path), f"${ENV_VAR}", "no such file; unset it or point it at a lab config")
        return path
    path = config_dir() / "lab.toml"
    return path if path.is_file() else None


# --------------------------------------------------------------------------------------------------
# Loading


def load(explicit: str | None = None) -> LabConfig:
    """Load the lab config found by :func:`find_config`, or the simulated lab's defaults."""
    path = find_config(explicit)
    if path is None:
        return sim_defaults()
    return load_file(path)


def sim_defaults() -> LabConfig:
    """The config of the embedded simulated lab before it starts (hosts and ports are filled in by it)."""
    return LabConfig(lab=LabSection(name="simulated lab", simulated=True))


def load_file(path: str | os.PathLike[str]) -> LabConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot be read ({exc.strerror or exc})") from None
    return loads(text, str(path))


def loads(text: str, source: str = "<string>") -> LabConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(syntax)", f"not valid TOML: {exc}") from None
    cfg = _build(LabConfig, data, source, "")
    cfg = dataclasses.replace(cfg, source=source)
    validate(cfg)
    return cfg


def validate(cfg: LabConfig) -> None:
    """Cross-field checks the types alone cannot express."""
    src = cfg.source
    for name in (*cfg.cluster.nodes, "dgx"):
        if name not in cfg.hosts:
            raise ConfigError(src, f"hosts.{name}", "missing; every cluster node and the dgx need a [hosts.NAME] table")
    if cfg.cluster.root not in cfg.cluster.nodes:
        raise ConfigError(src, "cluster.root", f"must be one of cluster.nodes {list(cfg.cluster.nodes)}")
    n = len(cfg.cluster.nodes)
    if n & (n - 1) or n == 0:
        raise ConfigError(src, "cluster.nodes", "distributed-llama needs a power-of-two node count (1, 2, 4, 8)")
    for ch, node in cfg.meter.channels.items():
        if not ch.isdigit() or not 0 <= int(ch) <= 3:
            raise ConfigError(src, f"meter.channels.{ch}", "channel ids are 0-3")
        if node not in cfg.cluster.nodes:
            raise ConfigError(src, f"meter.channels.{ch}", f"names node {node!r}, not in cluster.nodes")
    if not 1 <= cfg.meter.rate_hz <= 50:
        raise ConfigError(src, "meter.rate_hz", "expected a rate between 1 and 50 Hz")
    for tname, allowed in TEMPLATE_PLACEHOLDERS.items():
        extra = placeholders(cfg.template(tname)) - allowed
        if extra:
            raise ConfigError(
                src,
                f"commands.{tname}",
                f"unknown placeholder {{{sorted(extra)[0]}}}; allowed: {', '.join(sorted(allowed)) or 'none'}",
            )
    if not cfg.benchmark.tasks:
        raise ConfigError(src, "benchmark.tasks", "expected at least one task")
    if any(t.weight < 0 for t in cfg.benchmark.tasks) or sum(t.weight for t in cfg.benchmark.tasks) <= 0:
        raise ConfigError(src, "benchmark.tasks.weight", "weights must be >= 0 and not all 0")
    if not 0 < cfg.thresholds.coverage_min <= 1:
        raise ConfigError(src, "thresholds.coverage_min", "expected a fraction in (0, 1]")
    if cfg.sim.time_scale <= 0:
        raise ConfigError(src, "sim.time_scale", "expected a positive number")
    for key, host in cfg.hosts.items():
        if not host.address:
            raise ConfigError(src, f"hosts.{key}.address", "expected a host name or IP address")
        if not 0 < host.port < 65536:
            raise ConfigError(src, f"hosts.{key}.port", "expected a TCP port 1-65535")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (tuple, list):
        return "an array"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table"
    return str(tp)


def _convert(tp: Any, value: Any, src: str, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in get_args(tp):
            if arm is type(None) and value is None:
                return None
        arms = [a for a in get_args(tp) if a is not type(None)]
        return _convert(arms[0], value, src, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(src, key, f"expected a table, got {_show(value)}")
        return _build(tp, value, src, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(src, key, f"expected {_type_name(tp)}, got {_show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(src, key, f"expected an array, got {_show(value)}")
        (item_tp, *_rest) = get_args(tp)
        return tuple(_convert(item_tp, v, src, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(src, key, f"expected a table, got {_show(value)}")
        _k, v_tp = get_args(tp)
        return {str(k): _convert(v_tp, v, src, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(src, key, f"expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(src, key, f"expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(src, key, f"expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(src, key, f"expected a string, got {_show(value)}")
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported")  # a bug in this module, not user input


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _toml_fields(cls_or_obj: Any) -> list[dataclasses.Field[Any]]:
    """Fields that are TOML keys (``LabConfig.source`` records where the file was, it is not a key)."""
    return [f for f in dataclasses.fields(cls_or_obj) if f.metadata.get("toml", True)]


def _build(cls: type, data: Mapping[str, Any], src: str, prefix: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in _toml_fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            raise ConfigError(src, key, f"unknown key; expected one of: {', '.join(fields)}")
        kwargs[name] = _convert(hints[name], value, src, key)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(src, key, f"missing; expected {_type_name(hints[name])}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """The config as plain data (tuples become lists), e.g. for JSON or a written TOML file."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in _toml_fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    return cfg


def dumps(cfg: LabConfig) -> str:
    """Write a config as TOML (used by the simulated lab to hand out a config that points at it)."""
    out: list[str] = []

    def section(obj: Any, path: list[str]) -> None:
        scalars: list[tuple[str, Any]] = []
        subs: list[tuple[list[str], Any]] = []
        for f in _toml_fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                subs.append((path + [f.name], v))
            elif isinstance(v, dict) and v and all(dataclasses.is_dataclass(x) for x in v.values()):
                subs += [(path + [f.name, k], x) for k, x in v.items()]
            else:
                scalars.append((f.name, to_dict(v)))
        if scalars:
            if path:
                out.append(f"[{'.'.join(path)}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in scalars)
            out.append("")
        for p, v in subs:
            section(v, p)

    section(cfg, [])
    return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


__all__ = [
    "BenchmarkConfig",
    "ClusterConfig",
    "CommandsConfig",
    "ConfigError",
    "HostConfig",
    "LabConfig",
    "MeterConfig",
    "NotifyConfig",
    "PlanConfig",
    "SimConfig",
    "SimFaults",
    "SurgeryConfig",
    "TaskConfig",
    "Thresholds",
    "UiConfig",
    "WebConfig",
    "dumps",
    "fill",
    "find_config",
    "load",
    "load_file",
    "loads",
    "sim_defaults",
]

"""The lab config: every mistake is one line naming the file and the key; templates are quoted."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from epiconsole import config
from epiconsole.errors import ConfigError

ALL_HOSTS = "".join(f"[hosts.{n}]\naddress = '{n}'\n" for n in ("dgx", "pi0", "pi1", "pi2", "pi3"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lab.toml"
    p.write_text(text)
    return p


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = config.sim_defaults()
    again = config.load_file(write(tmp_path, config.dumps(cfg)))
    assert again == cfg
    assert again.digest() == cfg.digest()


def test_every_key_survives_dumps_including_ones_named_source(tmp_path: Path) -> None:
    import dataclasses

    cfg = dataclasses.replace(
        config.sim_defaults(), surgery=dataclasses.replace(config.SurgeryConfig(), source="/data/m x"),
    )
    again = config.load_file(write(tmp_path, config.dumps(cfg)))
    assert again.surgery.source == "/data/m x"
    assert again == cfg and again.source == str(tmp_path / "lab.toml")


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[meter\nport = 1", "(syntax)", "not valid TOML"),
        ("[meter]\nbaudrate = 9600", "meter.baudrate", "unknown key"),
        ("[meter]\nbaud = '115200'", "meter.baud", "expected an integer"),
        ("[hosts.pi1]\nport = 22", "hosts.pi1.address", "missing"),
        (ALL_HOSTS.replace("address = 'pi1'", "address = 'pi1'\nport = 70000"), "hosts.pi1.port", "TCP port"),
        ("[cluster]\nnodes = ['pi0', 'pi1', 'pi2']", "cluster.nodes", "power-of-two"),
        ("[cluster]\nroot = 'pi9'", "cluster.root", "must be one of"),
        ("[commands]\nhealth = 'vcgencmd {oops}'", "commands.health", "unknown placeholder {oops}"),
        ("[thresholds]\ntoken_denominator = 'some'", "thresholds.token_denominator", "one of"),
        ("[meter.channels]\n7 = 'pi0'", "meter.channels.7", "channel ids are 0-3"),
        ("[benchmark]\ntasks = [{ name = 'mmlu', shots = 'five' }]", "benchmark.tasks[0].shots", "integer"),
        ("[sim]\ntime_scale = true", "sim.time_scale", "expected a number"),
    ],
)
def test_mistakes_name_file_key_and_expectation(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert expected in message
    assert "\n" not in message


def test_missing_host_table_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[cluster]\nnodes = ['pi0', 'pi1', 'a', 'b']\n")
    with pytest.raises(ConfigError, match=r"hosts\.a: missing"):
        config.load_file(path)


def test_fill_quotes_every_value() -> None:
    evil = "x; rm -rf ~"
    line = config.fill("echo {a} {b}", a=evil, b=["one two", "$(id)"])
    assert shlex.split(line) == ["echo", evil, "one two", "$(id)"]


def test_fill_refuses_missing_values() -> None:
    with pytest.raises(KeyError):
        config.fill("echo {a}")


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = write(tmp_path, "[lab]\nname = 'from env'\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.load().simulated  # nothing found: the simulated lab
    xdg = tmp_path / "xdg" / "epiconsole"
    xdg.mkdir(parents=True)
    (xdg / "lab.toml").write_text("[lab]\nname = 'from xdg'\n")
    assert config.load().lab.name == "from xdg"
    monkeypatch.setenv(config.ENV_VAR, str(env_file))
    assert config.load().lab.name == "from env"
    explicit = tmp_path / "other.toml"
    explicit.write_text("[lab]\nname = 'explicit'\n")
    assert config.load(str(explicit)).lab.name == "explicit"


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[meter]\nrate_hz = 'fast'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "epiconsole", "matrix", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert str(path) in proc.stderr and "meter.rate_hz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_config_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "epiconsole", "matrix", "--config", str(tmp_path / "nope.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "no such file" in proc.stderr

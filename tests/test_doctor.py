"""``epiconsole doctor`` against the simulated lab, in-process and from another process, and against
a broken lab (every failure says what to do)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

NAMES = ["meter", "dgx", "pi0", "pi1", "pi2", "pi3", "api"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "config"))
    e.pop("EPICONSOLE_CONFIG", None)
    return e


def doctor(env: dict[str, str], *args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "epiconsole", "doctor", "--json", *args],
                          capture_output=True, text=True, timeout=180, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_doctor_sim_passes_all_seven_checks(env: dict[str, str]) -> None:
    rc, out = doctor(env, "--sim")
    assert [c["name"] for c in out["checks"]] == NAMES
    assert all(c["ok"] for c in out["checks"]), out
    assert rc == 0
    meter = next(c for c in out["checks"] if c["name"] == "meter")
    assert "simulated" in meter["detail"]


def test_standalone_sim_and_doctor_in_another_process(env: dict[str, str], tmp_path: Path) -> None:
    lab = subprocess.Popen([sys.executable, "-m", "epiconsole", "sim", "--dir", str(tmp_path / "lab")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert lab.stdout is not None
        config_path = lab.stdout.readline().strip()
        assert config_path.endswith("lab.toml"), lab.stderr.read() if lab.stderr else ""
        rc, out = doctor(env, "--config", config_path)
        assert rc == 0, out
        assert all(c["ok"] for c in out["checks"])
    finally:
        lab.send_signal(signal.SIGINT)
        assert lab.wait(timeout=30) == 0


def test_broken_lab_says_what_to_do(env: dict[str, str], tmp_path: Path) -> None:
    hosts = "".join(
        f"[hosts.{n}]\naddress = '127.0.0.1'\nport = 1\nknown_hosts = '{tmp_path}/kh'\nconnect_timeout_s = 2.0\n"
        for n in NAMES[1:6]
    )
    cfg = tmp_path / "lab.toml"
    cfg.write_text(f"[meter]\nport = '{tmp_path}/no-such-tty'\n[cluster]\napi_host = '127.0.0.1'\napi_port = 1\n{hosts}")
    rc, out = doctor(env, "--config", str(cfg))
    assert rc == 1
    by_name = {c["name"]: c for c in out["checks"]}
    assert not any(c["ok"] for c in out["checks"])
    assert "[meter] port" in by_name["meter"]["detail"]
    assert "127.0.0.1" in by_name["pi2"]["detail"]
    assert "dllama-api" in by_name["api"]["detail"]
    for c in out["checks"]:
        assert "\n" not in c["detail"]


async def test_doctor_names_each_fault_of_a_troubled_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process against a running simulated lab: a node down, a throttled node and a DGX whose host key
    changed each fail with their own sentence; the rest of the lab still checks out."""
    import asyncssh

    from epiconsole import config
    from epiconsole.doctor import run_checks
    from epiconsole.sim.lab import SimulatedLab

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    base = dataclasses.replace(config.sim_defaults(), sim=dataclasses.replace(config.sim_defaults().sim,
                                                                                time_scale=600.0))
    async with SimulatedLab(base, tmp_path / "lab") as lab:
        assert lab.config is not None and lab.state is not None
        impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
        dgx = lab.config.hosts["dgx"]
        wrong = tmp_path / "dgx_known_hosts"
        wrong.write_text(f"[127.0.0.1]:{dgx.port} {impostor[0]} {impostor[1]}\n")
        cfg = dataclasses.replace(lab.config, hosts={**lab.config.hosts,
                                                     "dgx": dataclasses.replace(dgx, known_hosts=str(wrong))})
        lab.state.faults.node_down.add("pi2")
        lab.state.faults.node_throttled.add("pi1")
        seen: list[str] = []
        checks = {c.name: c for c in await run_checks(cfg, lambda c: seen.append(c.name))}
    assert sorted(seen) == sorted(NAMES) and list(checks) == NAMES
    assert {n for n, c in checks.items() if not c.ok} == {"dgx", "pi1", "pi2"}, checks
    assert "does not match" in checks["dgx"].detail and "ssh-keygen -R" in checks["dgx"].detail
    assert "throttled now (arm-frequency-capped, throttled)" in checks["pi1"].detail
    assert "cannot reach pi2" in checks["pi2"].detail and "powered on" in checks["pi2"].detail
    assert "simulated" in checks["meter"].detail


async def test_a_lab_that_fails_to_boot_stops_what_it_started(tmp_path: Path) -> None:
    """``async with SimulatedLab`` never reaches its exit when start fails: start itself must clean up."""
    import socket

    from drivers.ssh import CommandFailed
    from epiconsole import config
    from epiconsole.sim.lab import SimStartError, SimulatedLab

    base = config.sim_defaults()
    base = dataclasses.replace(base, commands=dataclasses.replace(base.commands, start_root="false"),
                               sim=dataclasses.replace(base.sim, time_scale=600.0))
    lab = SimulatedLab(base, tmp_path / "lab")
    with pytest.raises(SimStartError, match="did not start: start root failed on pi0") as err:
        async with lab:
            pass
    assert isinstance(err.value.__cause__, CommandFailed)
    assert lab.ssh is None and lab.meter is None
    known = (tmp_path / "lab" / "known_hosts").read_text().split()
    port = int(known[0].split(":")[1].rstrip("]"))
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_doctor_sim_that_cannot_boot_is_one_sentence(env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "lab.toml"
    cfg.write_text("[commands]\nstart_worker = 'false'\n")
    proc = subprocess.run([sys.executable, "-m", "epiconsole", "doctor", "--sim", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("epiconsole: the simulated lab in ") and "start worker failed on pi1" in proc.stderr
    assert proc.stderr.count("\n") == 1

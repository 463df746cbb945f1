"""SSH test fixtures: the simulated lab's asyncssh servers, and a real OpenSSH server on loopback.

``sim_hosts`` starts :class:`~epiconsole.sim.ssh.SimSSH` for a fresh :class:`SimLab` and gives the
drivers' :class:`SshTarget` values for every machine. ``OpenSSHServer`` runs Debian's ``/usr/sbin/sshd``
as the current user (root or not) with a throwaway host key, a throwaway user key, its own
``AuthorizedKeysFile`` and a fake ``vcgencmd`` first on the session's PATH (``SetEnv PATH=...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from drivers.ssh import SshPool, SshTarget
from epiconsole.config import LabConfig, SimConfig, sim_defaults
from epiconsole.sim.ssh import SimSSH
from epiconsole.sim.state import SimLab

SSHD = "/usr/sbin/sshd"
#: Simulated seconds per real second in these tests (virtual sleeps and model loads become short).
TIME_SCALE = 600.0


@dataclass
class SimHosts:
    lab: SimLab
    sim: SimSSH
    dir: Path
    targets: dict[str, SshTarget]
    pool: SshPool
    cfg: LabConfig

    def target(self, name: str, **changes: object) -> SshTarget:
        return dataclasses.replace(self.targets[name], **changes)  # type: ignore[arg-type]


def sim_config(time_scale: float = TIME_SCALE) -> LabConfig:
    base = sim_defaults()
    return dataclasses.replace(base, sim=SimConfig(time_scale=time_scale))


def targets_for(sim: SimSSH, ports: dict[str, int], **changes: object) -> dict[str, SshTarget]:
    return {
        name: SshTarget(name, "127.0.0.1", port, getpass.getuser(), str(sim.client_key), str(sim.known_hosts),
                        connect_timeout_s=5.0, command_timeout_s=20.0, keepalive_s=5.0, **changes)  # type: ignore[arg-type]
        for name, port in ports.items()
    }


@pytest_asyncio.fixture
async def sim_hosts(tmp_path: Path) -> AsyncIterator[SimHosts]:
    cfg = sim_config()
    lab = SimLab(cfg)
    sim = SimSSH(lab, tmp_path)
    ports = await sim.start()
    targets = targets_for(sim, ports)
    pool = SshPool(targets)
    try:
        yield SimHosts(lab, sim, tmp_path, targets, pool, cfg)
    finally:
        await pool.close()
        await sim.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


FAKE_VCGENCMD = """#!/bin/sh
# A stand-in for the Pi firmware tool, answering like a Pi 5 (values come from files the test controls).
case "$1 $2" in
  "measure_temp ") echo "temp=$(cat {state}/temp)'C" ;;
  "get_throttled ") echo "throttled=$(cat {state}/throttled)" ;;
  "measure_clock arm") echo "frequency(0)=2400000000" ;;
  *) echo "error=2 error_msg=\\"Command not registered\\"" ; exit 255 ;;
esac
"""


#: A long-running stand-in for distributed-llama's worker (its command line is what pkill -f matches).
FAKE_DLLAMA = """#!/bin/sh
echo "fake dllama $*"
while :; do sleep 1; done
"""


@dataclass
class OpenSSHServer:
    """A private sshd on 127.0.0.1: ``target`` reaches it with host-key checking on."""

    dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    target: SshTarget
    state: Path

    def log(self) -> str:
        path = self.dir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "epiconsole-test", "-f", str(path)],
                   check=True, capture_output=True)


def start_openssh(base: Path) -> OpenSSHServer:
    """Start sshd -D on a free loopback port as the current user; skip when sshd is missing."""
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.skip("Debian's openssh-server is not installed (/usr/sbin/sshd); "
                    "install it with: apt-get install -y openssh-server")
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    host_key, user_key = base / "host_ed25519", base / "user_ed25519"
    _keygen(host_key)
    _keygen(user_key)
    authorized = base / "authorized_keys"
    shutil.copy(user_key.with_suffix(".pub"), authorized)
    os.chmod(authorized, 0o600)
    bindir, state = base / "bin", base / "state"
    bindir.mkdir()
    state.mkdir()
    (state / "temp").write_text("51.2\n")
    (state / "throttled").write_text("0x0\n")
    (state / "governor").write_text("ondemand\n")
    vcgencmd = bindir / "vcgencmd"
    vcgencmd.write_text(FAKE_VCGENCMD.replace("{state}", str(state)))
    vcgencmd.chmod(0o755)
    dllama = bindir / "dllama"
    dllama.write_text(FAKE_DLLAMA)
    dllama.chmod(0o755)
    if os.geteuid() == 0:
        # sshd started as root insists on its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    config = base / "sshd_config"
    config.write_text(
        "\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            f"AuthorizedKeysFile {authorized}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "PidFile none",
            "LogLevel VERBOSE",
            # The fake vcgencmd comes first on the session's PATH (OpenSSH >= 7.8).
            f"SetEnv PATH={bindir}:/usr/local/bin:/usr/bin:/bin",
        ]) + "\n"
    )
    log = open(base / "sshd.log", "wb")  # noqa: SIM115 - owned by the server process's lifetime
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(base / 'sshd.log').read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            if s.recv(4).startswith(b"SSH-"):
                break
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("sshd did not start listening within 10 s")
    known_hosts = base / "known_hosts"
    public = host_key.with_suffix(".pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")
    target = SshTarget("pi0", "127.0.0.1", port, getpass.getuser(), str(user_key), str(known_hosts),
                       connect_timeout_s=10.0, command_timeout_s=20.0, keepalive_s=5.0)
    return OpenSSHServer(base, port, proc, target, state)


@pytest.fixture
def openssh(tmp_path: Path) -> Iterator[OpenSSHServer]:
    server = start_openssh(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(5)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)


def pgrep(pattern: str) -> list[str]:
    """Command lines of this machine's processes matching ``pattern`` (pgrep -af), minus pgrep itself."""
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


async def eventually(check, timeout: float = 5.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``check()`` until it returns a truthy value (returned) or the timeout passes (last value)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(interval)

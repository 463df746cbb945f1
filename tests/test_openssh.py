"""The drivers against a real OpenSSH server on loopback (Debian's openssh-server, run as the current user).

CI installs it with ``apt-get install -y openssh-server``; without ``/usr/sbin/sshd`` these tests skip
and say so.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal

import asyncssh
import pytest

from drivers.cluster import Cluster
from drivers.ssh import AuthRefused, HostKeyMismatch, HostKeyUnknown, SshPool, SshTimeout
from drivers.templates import fill
from epiconsole.config import CommandsConfig
from tests.ssh_fixtures import OpenSSHServer, eventually, openssh, pgrep  # noqa: F401  (fixture)

pytestmark = pytest.mark.openssh


def cluster(server: OpenSSHServer, pool: SshPool) -> Cluster:
    # This machine has no cpufreq in sysfs: the governor is read from a file the test controls.
    templates = dataclasses.asdict(CommandsConfig())
    templates["health"] = templates["health"].replace(
        "/sys/devices/system/cpu/cpufreq/policy0/scaling_governor", str(server.state / "governor"))
    return Cluster(pool, templates, nodes=("pi0",), root="pi0")


async def test_health_over_openssh(openssh: OpenSSHServer) -> None:  # noqa: F811
    pool = SshPool({"pi0": openssh.target})
    try:
        cl = cluster(openssh, pool)
        h = await cl.health("pi0")
        assert h.ok, (h.error, openssh.log()[-2000:])
        assert h.temp_c == 51.2 and h.throttled == 0 and h.arm_hz == 2_400_000_000 and h.governor == "ondemand"
        assert h.load1 is not None and h.load1 >= 0
        (openssh.state / "throttled").write_text("0x50005\n")
        (openssh.state / "governor").write_text("performance\n")
        h = await cl.health("pi0")
        assert h.throttled_now == ("under-voltage", "throttled") == h.throttled_since
        assert h.governor == "performance"
    finally:
        await pool.close()


async def test_placeholder_is_one_literal_argument(openssh: OpenSSHServer, tmp_path) -> None:  # noqa: F811, ANN001
    pool = SshPool({"pi0": openssh.target})
    work = tmp_path / "work"
    work.mkdir()
    value = "x; rm -rf ~; touch PWNED1 $(touch PWNED2) `touch PWNED3` && touch PWNED4 | touch PWNED5"
    try:
        res = await pool.run("pi0", fill("cd {d} && printf '%s\\n' {v}", d=str(work), v=value), check=True)
    finally:
        await pool.close()
    assert res.stdout == value + "\n"
    assert list(work.iterdir()) == []


async def test_cancelled_and_timed_out_streams_leave_no_remote_process(openssh: OpenSSHServer) -> None:  # noqa: F811
    pool = SshPool({"pi0": openssh.target})
    seconds = random.randint(700_000, 799_999)  # a command line no other process on this machine has
    marker = f"sleep {seconds}"
    try:
        stream = pool.stream("pi0", f"echo started; {marker}; echo never")
        assert await stream.__anext__() == "started"
        assert await eventually(lambda: pgrep(marker))
        await stream.cancel()
        assert await eventually(lambda: not pgrep(marker)), pgrep(marker)

        with pytest.raises(SshTimeout):
            async for _ in pool.stream("pi0", f"sh -c '{marker}; echo never'", timeout=1.0):
                pass
        assert await eventually(lambda: not pgrep(marker)), pgrep(marker)
        # The pooled connection still works afterwards.
        assert (await pool.run("pi0", "echo ok")).stdout == "ok\n"
    finally:
        await pool.close()


async def test_detached_workers_survive_the_session_and_stop(openssh: OpenSSHServer) -> None:  # noqa: F811
    """The default start_worker template detaches; the default stop_worker template stops it even though its
    pkill also hits the remote shell running it (which the driver tolerates)."""
    pool = SshPool({"pi0": openssh.target, "pi1": dataclasses.replace(openssh.target, name="pi1")})
    cl = Cluster(pool, dataclasses.asdict(CommandsConfig()), nodes=("pi0", "pi1"), root="pi0",
                 worker_port=random.randint(20000, 30000))
    pattern = f"dllama worker --port {cl.worker_port}"
    try:
        await cl.start_workers()
        assert await eventually(lambda: pgrep(pattern)), openssh.log()[-1000:]
        res = await pool.run("pi1", "pkill -f 'dllama worker' || true")
        assert res.exit_signal == "TERM"  # the shell matched its own pattern: why '[d]llama worker' is better
        assert await eventually(lambda: not pgrep(pattern))
        await cl.start_workers()
        assert await eventually(lambda: pgrep(pattern))
        await cl.stop_workers()
        assert await eventually(lambda: not pgrep(pattern))
    finally:
        await pool.close()
        for line in pgrep(pattern):
            os.kill(int(line.split()[0]), signal.SIGKILL)


async def test_host_key_and_auth_refusals(openssh: OpenSSHServer, tmp_path) -> None:  # noqa: F811, ANN001
    t = openssh.target
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{t.port} {impostor[0]} {impostor[1]}\n")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    other_key = tmp_path / "other"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(other_key)
    other_key.chmod(0o600)
    cases = [
        (dataclasses.replace(t, known_hosts=str(wrong)), HostKeyMismatch, "does not match"),
        (dataclasses.replace(t, known_hosts=str(empty)), HostKeyUnknown, f"ssh-keyscan -p {t.port} 127.0.0.1"),
        (dataclasses.replace(t, key=str(other_key)), AuthRefused, "refused our key"),
    ]
    for target, error, text in cases:
        pool = SshPool({"pi0": target})
        with pytest.raises(error, match=text):
            await pool.run("pi0", "true")
        await pool.close()

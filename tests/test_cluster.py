"""The cluster driver against the simulated lab's SSH servers (real asyncssh on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re

import aiohttp
import asyncssh
import pytest

from drivers.cluster import (
    ApiNotReady,
    Cluster,
    CopyMismatch,
    NodeHealth,
    SensorError,
    UnsafeRemotePath,
    parse_health,
    parse_millidegrees,
    throttle_names,
    wait_api_ready,
)
from drivers.ssh import (
    AuthRefused,
    CommandFailed,
    HostKeyMismatch,
    HostKeyUnknown,
    HostUnreachable,
    SshPool,
    SshTimeout,
)
from drivers.templates import fill
from epiconsole.sim.modelfile import write_model_file
from epiconsole.sim.physics import Deployed
from tests.ssh_fixtures import SimHosts, eventually, free_port, sim_hosts  # noqa: F401  (fixture)


def cluster_for(h: SimHosts, pool: SshPool | None = None, **kw: object) -> Cluster:
    c = h.cfg.cluster
    options: dict[str, object] = dict(worker_port=c.worker_port, api_port=c.api_port, nthreads=c.nthreads,
                                      ambient_host=c.ambient_host)
    options.update(kw)
    return Cluster(pool or h.pool, dataclasses.asdict(h.cfg.commands), nodes=c.nodes, root=c.root,
                   **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Parsing (real firmware output)


def test_parse_health_of_a_real_pi5() -> None:
    text = "temp=61.3'C\nthrottled=0x80008\nfrequency(0)=2400023808\nperformance\n3.84 2.91 1.40 5/246 12034\n"
    h = parse_health("pi0", text)
    assert h == NodeHealth("pi0", 61.3, 0x80008, ("soft-temperature-limit",), ("soft-temperature-limit",),
                           2400023808, "performance", 3.84, True, None)


def test_parse_health_reports_what_is_missing() -> None:
    h = parse_health("pi1", "temp=50.0'C\nsh: 1: vcgencmd: not found\nondemand\n")
    assert not h.ok and h.temp_c == 50.0 and h.governor == "ondemand"
    assert h.error == "pi1 did not report its throttled state, arm clock, load average; check the health command template"


def test_parse_health_of_firmware_variants() -> None:
    """A Pi 4's arm clock is frequency(48); vendor kernels add governors; a pty ends lines with CRLF."""
    text = "temp=48.3'C\r\nthrottled=0x50005\r\nfrequency(48)=1800404352\r\ninteractive\r\n0.00 0.01 0.05 1/123 4567\r\n"
    h = parse_health("pi3", text)
    assert h.ok and (h.temp_c, h.throttled, h.arm_hz, h.governor) == (48.3, 0x50005, 1800404352, "interactive")
    assert h.throttled_now == ("under-voltage", "throttled") == h.throttled_since
    assert parse_health("pi3", "temp=-2.0'C\nthrottled=0x0\nfrequency(0)=0\nperformance\n0.00 0.00 0.00 1/1 1\n").temp_c == -2.0


def test_throttle_bits() -> None:
    assert throttle_names(0x5) == ("under-voltage", "throttled")
    assert throttle_names(0x50005 >> 16) == ("under-voltage", "throttled")
    assert throttle_names(0xA) == ("arm-frequency-capped", "soft-temperature-limit")


def test_millidegrees() -> None:
    assert parse_millidegrees("22125\n") == 22.125
    with pytest.raises(SensorError, match="DS18B20"):
        parse_millidegrees("")


# --------------------------------------------------------------------------------------------------
# Health, governor, ambient, provenance


async def test_health_and_throttling(sim_hosts: SimHosts) -> None:  # noqa: F811
    cl, lab = cluster_for(sim_hosts), sim_hosts.lab
    h = await cl.health("pi2")
    assert h.ok and h.error is None
    assert h.governor == "ondemand" and h.arm_hz == 1_500_000_000 and h.load1 == 0.08
    assert h.throttled == 0 and h.throttled_now == () and h.throttled_since == ()
    assert h.temp_c == pytest.approx(lab.temperature("pi2"), abs=0.1)
    lab.faults.node_throttled.add("pi2")
    h = await cl.health("pi2")
    assert h.throttled == 0x60006
    assert h.throttled_now == ("arm-frequency-capped", "throttled") == h.throttled_since
    lab.faults.node_throttled.discard("pi2")
    h = await cl.health("pi2")
    assert h.throttled_now == () and h.throttled_since == ("arm-frequency-capped", "throttled")
    readings = await cl.health_all()
    assert set(readings) == {"pi0", "pi1", "pi2", "pi3"} and all(r.ok for r in readings.values())


async def test_governor_change(sim_hosts: SimHosts) -> None:  # noqa: F811
    cl = cluster_for(sim_hosts)
    await cl.set_governor("pi1", "performance")
    h = await cl.health("pi1")
    assert h.governor == "performance" and h.arm_hz == 2_400_000_000
    with pytest.raises(CommandFailed, match="Invalid argument"):
        await cl.set_governor("pi1", "turbo")
    assert sim_hosts.lab.node("pi1").governor == "performance"


async def test_ambient_and_provenance(sim_hosts: SimHosts) -> None:  # noqa: F811
    cl = cluster_for(sim_hosts)
    assert await cl.ambient_c() == 22.0
    sim_hosts.lab.faults.hot_ambient = True
    assert await cl.ambient_c() == 31.0
    p = await cl.provenance("pi3")
    assert p.kernel == sim_hosts.lab.node("pi3").kernel and p.dllama == "dllama 0.16.2 (simulated)"
    bad = cluster_for(sim_hosts, ambient_host="pi1")
    with pytest.raises(SensorError, match="cannot be read"):
        await bad.ambient_c()


def test_fill_quotes_every_value_and_refuses_nul() -> None:
    assert fill("cat {path}", path="/m/it's here; rm -rf ~") == "cat '/m/it'\"'\"'s here; rm -rf ~'"
    assert fill("rsync {files} {dest}", files=["/a b", "$(id)"], dest="") == "rsync '/a b' '$(id)' ''"
    with pytest.raises(ValueError, match="NUL"):
        fill("echo {v}", v="x\x00; rm -rf ~")
    with pytest.raises(ValueError, match="format spec"):
        fill("echo {v!r}", v="x")


async def test_placeholder_value_arrives_as_one_literal_argument(sim_hosts: SimHosts) -> None:  # noqa: F811
    value = "x; rm -rf ~"
    res = await sim_hosts.pool.run("pi0", fill("echo {v} && echo done", v=value))
    assert res.stdout == "x; rm -rf ~\ndone\n" and res.ok


# --------------------------------------------------------------------------------------------------
# Refusals


async def test_host_key_mismatch_is_refused(sim_hosts: SimHosts) -> None:  # noqa: F811
    t = sim_hosts.targets["pi1"]
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
    kh = sim_hosts.dir / "other_known_hosts"
    kh.write_text(f"[127.0.0.1]:{t.port} {impostor[0]} {impostor[1]}\n")
    pool = SshPool({"pi1": dataclasses.replace(t, known_hosts=str(kh))})
    h = await cluster_for(sim_hosts, pool=SshPool({**sim_hosts.targets, "pi1": dataclasses.replace(
        t, known_hosts=str(kh))})).health("pi1")
    assert not h.ok and h.error is not None and "does not match" in h.error
    with pytest.raises(HostKeyMismatch) as err:
        await pool.run("pi1", "true")
    msg = str(err.value)
    assert f"ssh-keygen -R '[127.0.0.1]:{t.port}' -f {kh}" in msg and f"ssh-keyscan -p {t.port} 127.0.0.1" in msg
    await pool.close()


async def test_unknown_host_is_refused(sim_hosts: SimHosts) -> None:  # noqa: F811
    t = sim_hosts.targets["pi1"]
    other = sim_hosts.targets["pi2"]
    kh = sim_hosts.dir / "only_pi2"
    kh.write_text(next(line for line in sim_hosts.sim.known_hosts.read_text().splitlines() if f":{other.port} " in line))
    for path in (kh, sim_hosts.dir / "does-not-exist"):
        pool = SshPool({"pi1": dataclasses.replace(t, known_hosts=str(path))})
        with pytest.raises(HostKeyUnknown) as err:
            await pool.run("pi1", "true")
        assert f"`ssh-keyscan -p {t.port} 127.0.0.1 >> {path}`" in str(err.value)
        assert "verify its fingerprint" in str(err.value)
        await pool.close()


async def test_unusable_key_files_are_refused_with_a_sentence(sim_hosts: SimHosts) -> None:  # noqa: F811
    garbage = sim_hosts.dir / "garbage_key"
    garbage.write_text("not a key\n")
    encrypted = sim_hosts.dir / "encrypted_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(encrypted, format_name="pkcs8-pem",
                                                                   passphrase="secret")
    cases = [(garbage, "cannot be read"), (encrypted, f"protected by a passphrase; load it with `ssh-add {encrypted}`"),
             (sim_hosts.dir / "missing_key", "cannot be read")]
    for key, text in cases:
        pool = SshPool({"pi1": sim_hosts.target("pi1", key=str(key))})
        with pytest.raises(AuthRefused, match=re.escape(text)):
            await pool.run("pi1", "true")
        await pool.close()
        h = await cluster_for(sim_hosts, pool=SshPool({**sim_hosts.targets, "pi1": sim_hosts.target(
            "pi1", key=str(key))})).health("pi1")
        assert not h.ok and text in (h.error or "")


async def test_unreachable_host(sim_hosts: SimHosts) -> None:  # noqa: F811
    port = free_port()  # nothing listens there
    pool = SshPool({"pi1": dataclasses.replace(sim_hosts.targets["pi1"], port=port)})
    with pytest.raises(HostUnreachable, match=f"cannot reach pi1 at 127.0.0.1:{port}"):
        await pool.run("pi1", "true")
    await pool.close()
    sim_hosts.lab.faults.node_down.add("pi3")
    h = await cluster_for(sim_hosts).health("pi3")
    assert not h.ok and h.temp_c is None and "cannot reach pi3" in (h.error or "")


async def test_silent_host_times_out(sim_hosts: SimHosts) -> None:  # noqa: F811
    """A host whose TCP port accepts but never speaks SSH (hung sshd, wrong service) is a timeout."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        target = dataclasses.replace(sim_hosts.targets["pi1"], port=port, connect_timeout_s=0.3)
        pool = SshPool({"pi1": target})
        with pytest.raises(SshTimeout, match="did not answer within 0.3 s"):
            await pool.run("pi1", "true")
        await pool.close()


# --------------------------------------------------------------------------------------------------
# Timeouts and cancellation leave nothing running


async def test_timed_out_command_leaves_no_process(sim_hosts: SimHosts) -> None:  # noqa: F811
    with pytest.raises(SshTimeout, match="did not finish within 0.3 s"):
        await sim_hosts.pool.run("pi1", "sleep 1000000", timeout=0.3)
    assert await eventually(lambda: sim_hosts.sim.running("pi1") == [])
    # The pooled connection is still good afterwards.
    assert (await sim_hosts.pool.run("pi1", "echo ok")).stdout == "ok\n"


async def test_stream_lines_cancel_and_timeout(sim_hosts: SimHosts) -> None:  # noqa: F811
    cl = cluster_for(sim_hosts)
    lines = [line async for line in cl.stream("pi0", "echo one; echo two; nope")]
    assert lines == ["one", "two", "sh: 1: nope: not found"]
    s = cl.stream("pi0", "echo started; sleep 1000000; echo never")
    assert await s.__anext__() == "started"
    # The login shell stays for a compound command, as bash does on a Pi.
    assert await eventually(lambda: sim_hosts.sim.running("pi0") == [
        "bash -c echo started; sleep 1000000; echo never", "sleep 1000000"])
    await s.cancel()
    assert await eventually(lambda: sim_hosts.sim.running("pi0") == [])
    with pytest.raises(SshTimeout, match="ran past 0.3 s"):
        async for _ in cl.stream("pi0", "sleep 1000000", timeout=0.3):
            pass
    assert await eventually(lambda: sim_hosts.sim.running("pi0") == [])
    # A task cancelled while reading also kills the remote command.
    task = asyncio.create_task(_drain(cl.stream("pi0", "sleep 1000000")))
    assert await eventually(lambda: sim_hosts.sim.running("pi0") == ["sleep 1000000"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await eventually(lambda: sim_hosts.sim.running("pi0") == [])


async def test_stream_without_a_terminal(sim_hosts: SimHosts) -> None:  # noqa: F811
    """A host that refuses pseudo-terminals gets plain sessions; cancel still kills (signal request)."""
    sim_hosts.sim.permit_tty = False
    s = sim_hosts.pool.stream("pi1", "echo go; nope; sleep 1000000")
    assert await s.__anext__() == "go"
    assert not s.pty and "pi1" in sim_hosts.pool._no_pty
    assert await eventually(lambda: "sleep 1000000" in sim_hosts.sim.running("pi1"))
    await s.cancel()
    assert await eventually(lambda: sim_hosts.sim.running("pi1") == [])
    assert s.stderr_tail == ("sh: 1: nope: not found",)


async def _drain(stream: object) -> None:
    async for _ in stream:  # type: ignore[attr-defined]
        pass


async def test_session_limit(sim_hosts: SimHosts) -> None:  # noqa: F811
    pool = SshPool(sim_hosts.targets, max_sessions=2)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(sim_hosts.sim.running("pi1")))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(pool.run("pi1", "sleep 180") for _ in range(5)))  # 0.3 s each at x600
    watcher.cancel()
    assert peak == 2
    await pool.close()


# --------------------------------------------------------------------------------------------------
# Deploy: copy, verify, workers, root, API


async def test_copy_and_verify(sim_hosts: SimHosts) -> None:  # noqa: F811
    cl = cluster_for(sim_hosts)
    src = sim_hosts.dir / "dgx-out"
    src.mkdir()
    model = write_model_file(src / "dllama_model_drop1_all_q40.m", Deployed("drop1_all", experts=1, target="all",
                                                                          strategy="remove"))
    tok = src / "dllama_tokenizer_drop1_all.t"
    tok.write_bytes(b"tokenizer")
    dest = sim_hosts.dir / "pi0-models"
    checks = await cl.copy_and_verify("dgx", [str(model), str(tok)], "pi0", str(dest))
    assert [c.ok for c in checks] == [True, True]
    assert checks[0].sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert checks[0].size == model.stat().st_size and (dest / model.name).read_bytes() == model.read_bytes()
    wrong = {str(model): (model.stat().st_size, "0" * 64), str(tok): (9, hashlib.sha256(b"tokenizer").hexdigest())}
    with pytest.raises(CopyMismatch, match="differs from the source") as err:
        await cl.copy_and_verify("dgx", [str(model), str(tok)], "pi0", str(dest), expected=wrong)
    assert [c.ok for c in err.value.checks] == [False, True]


@pytest.mark.parametrize(("dest", "files", "what"), [
    ("/home/pi/models; touch pwned", None, "model directory"),
    ("/home/pi/my models", None, "model directory"),
    ("/home/pi/$(id)", None, "model directory"),
    ("/home/pi/models", ["-e sh x.sh"], "read by rsync as an option"),
])
async def test_push_refuses_values_the_remote_shell_would_interpret(
        sim_hosts: SimHosts, dest: str, files: list[str] | None, what: str) -> None:  # noqa: F811
    """rsync runs the destination path through the node's shell again, where no quoting of ours survives."""
    cl = cluster_for(sim_hosts)
    src = sim_hosts.dir / "a.m"
    src.write_bytes(b"model")
    with pytest.raises(UnsafeRemotePath, match=what):
        await cl.copy_and_verify("dgx", files or [str(src)], "pi0", str(sim_hosts.dir / "out") + dest,
                                 expected={(files or [str(src)])[0]: (5, "0" * 64)})
    assert sorted(p.name for p in sim_hosts.dir.iterdir() if p.name.startswith("out")) == []


async def test_workers_root_and_api(sim_hosts: SimHosts) -> None:  # noqa: F811
    lab = sim_hosts.lab
    cl = cluster_for(sim_hosts, api_port=free_port(), api_host="127.0.0.1")
    models = sim_hosts.dir / "models"
    models.mkdir()
    model = write_model_file(models / "dllama_model_drop2_all_q40.m", Deployed("drop2_all", experts=2, target="all",
                                                                             strategy="remove"))
    tok = models / "dllama_tokenizer_drop2_all.t"
    tok.write_bytes(b"t")
    with pytest.raises(ApiNotReady, match="was not ready after 0.2 s"):
        await cl.wait_api_ready(timeout=0.2, interval=0.05)
    await cl.start_workers()
    assert await eventually(lambda: all(lab.node(n).worker_running for n in ("pi1", "pi2", "pi3")))
    assert not lab.node("pi0").worker_running
    await cl.start_root(str(model), str(tok))
    waited = await cl.wait_api_ready(timeout=10.0, interval=0.02)
    assert waited >= 0 and lab.deployed == Deployed("drop2_all", experts=2, target="all", strategy="remove")
    async with aiohttp.ClientSession() as http, http.get(cl.api_url + "/v1/models") as resp:
        body = await resp.json()
    assert body["data"][0]["id"] == "dllama_model_drop2_all_q40"
    assert sim_hosts.sim.running("pi0")[0].startswith("dllama-api --port")
    await cl.stop_root()
    assert await eventually(lambda: lab.deployed is None and not lab.node("pi0").root_running)
    with pytest.raises(ApiNotReady):
        await wait_api_ready(cl.api_url, timeout=0.2, interval=0.05)
    await cl.stop_workers()
    assert await eventually(lambda: not any(lab.node(n).worker_running for n in lab.nodes))
    assert all(sim_hosts.sim.running(n) == [] for n in lab.nodes)


async def test_root_refuses_without_workers(sim_hosts: SimHosts) -> None:  # noqa: F811
    cl = cluster_for(sim_hosts, api_port=free_port())
    model = write_model_file(sim_hosts.dir / "m.m", Deployed("baseline"))
    (sim_hosts.dir / "t.t").write_bytes(b"t")
    # The default template detaches the root and sends its log to /tmp, as on a real Pi: the launch
    # succeeds and the failure shows in the log; the readiness probe is what notices it.
    await cl.start_root(str(model), str(sim_hosts.dir / "t.t"))
    log = sim_hosts.dir / "machines" / "pi0" / "tmp" / "dllama-api.log"
    assert await eventually(lambda: log.exists() and "Cannot connect to worker" in log.read_text())
    with pytest.raises(ApiNotReady, match="dllama-api.log"):
        await cl.wait_api_ready(timeout=0.3, interval=0.05)


# --------------------------------------------------------------------------------------------------
# The pooled connection under trouble


async def test_refused_terminal_keeps_the_connection_and_its_commands(sim_hosts: SimHosts) -> None:  # noqa: F811
    """A host that refuses a pty answers on a live connection: commands already running on it go on."""
    pool = sim_hosts.pool
    sim_hosts.sim.permit_tty = False
    running = asyncio.create_task(pool.run("pi1", "sleep 600 && echo fine"))  # 1 s at x600
    assert await eventually(lambda: "sleep 600" in sim_hosts.sim.running("pi1"))
    conn = await pool.connection("pi1")
    assert [line async for line in pool.stream("pi1", "echo go")] == ["go"]
    assert "pi1" in pool._no_pty and await pool.connection("pi1") is conn
    result = await running
    assert result.ok and result.stdout == "fine\n"


async def test_connection_lost_mid_command_is_unreachable_not_a_result(sim_hosts: SimHosts) -> None:  # noqa: F811
    pool, lab = sim_hosts.pool, sim_hosts.lab
    running = asyncio.create_task(pool.run("pi3", "sleep 100000"))
    assert await eventually(lambda: sim_hosts.sim.running("pi3"))
    lab.faults.node_down.add("pi3")
    with pytest.raises(HostUnreachable, match="connection to pi3 .* was lost while `sleep 100000` ran"):
        await running
    lab.faults.node_down.discard("pi3")
    for pty in (True, False):
        lab.faults.node_down.discard("pi3")
        stream = pool.stream("pi3", "echo first; sleep 100000", pty=pty)
        assert await stream.__anext__() == "first"
        lab.faults.node_down.add("pi3")
        with pytest.raises(HostUnreachable, match="pi3"):
            async for _ in stream:
                pass
        assert stream.exit_status is None and stream.finished
    lab.faults.node_down.discard("pi3")
    assert (await pool.run("pi3", "echo back")).stdout == "back\n"


async def test_waiting_for_a_free_session_is_bounded(sim_hosts: SimHosts) -> None:  # noqa: F811
    pool = SshPool(sim_hosts.targets, max_sessions=1)
    async with pool.stream("pi2", "echo busy; sleep 100000") as busy:
        assert await busy.__anext__() == "busy"
        with pytest.raises(SshTimeout, match="found no free session on pi2 within 0.3 s"):
            await pool.run("pi2", "true", timeout=0.3)
        waiting = pool.stream("pi2", "echo never", timeout=0.3)
        with pytest.raises(SshTimeout, match="found no free session on pi2 within 0.3 s"):
            await waiting.__anext__()
        assert waiting.finished and [line async for line in waiting] == []
    assert (await pool.run("pi2", "echo free", timeout=10)).stdout == "free\n"
    assert [line async for line in pool.stream("pi2", "echo free", timeout=10)] == ["free"]
    await pool.close()

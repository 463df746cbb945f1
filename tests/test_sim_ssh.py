"""The simulated machines: the shell's POSIX parsing, its handlers against the shared SimLab, and the
asyncssh servers (host keys, key-only auth, node_down, cancellation leaving nothing behind)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
from pathlib import Path

import asyncssh
import pytest

from drivers.ssh import AuthRefused, HostUnreachable, SshPool
from drivers.templates import fill
from epiconsole.sim.modelfile import read_model_file, write_model_file
from epiconsole.sim.physics import Deployed
from epiconsole.sim.shell import (
    AndOr,
    Io,
    Machine,
    NullSink,
    Redirect,
    Shell,
    ShellSyntaxError,
    Sink,
    Source,
    parse,
)
from epiconsole.sim.state import SimLab
from tests.ssh_fixtures import SimHosts, eventually, sim_config, sim_hosts  # noqa: F401  (fixture)

# --------------------------------------------------------------------------------------------------
# Parsing


def argvs(source: str) -> list[tuple[str, ...]]:
    return [c.argv for a in parse(source) for p in (a.first, *(p for _, p in a.rest)) for c in p.commands]


def test_quoted_value_stays_one_literal_argument() -> None:
    command = fill("echo {v}", v="x; rm -rf ~")
    assert argvs(command) == [("echo", "x; rm -rf ~")]
    assert argvs(fill("echo {v}", v=";")) == [("echo", ";")]
    assert argvs(fill("echo {v}", v=["a b", "&&", "c"])) == [("echo", "a b", "&&", "c")]


def test_operators_lists_and_background() -> None:
    lists = parse("a && b || c; d | e -x &")
    assert [len(x.rest) for x in lists] == [2, 0]
    assert [op for op, _ in lists[0].rest] == ["&&", "||"]
    assert lists[1].background and not lists[0].background
    assert [c.argv for c in lists[1].first.commands] == [("d",), ("e", "-x")]


def test_redirections_and_fd_numbers() -> None:
    (a,) = parse("setsid nohup dllama worker --port 9998 > /tmp/w.log 2>&1 < /dev/null &")
    cmd = a.first.commands[0]
    assert cmd.argv == ("setsid", "nohup", "dllama", "worker", "--port", "9998")
    assert cmd.redirects == (Redirect(1, ">", "/tmp/w.log"), Redirect(2, ">&", "1"), Redirect(0, "<", "/dev/null"))
    assert a.background
    # "2 > f" is the word 2 and a stdout redirection; "2>f" redirects stderr.
    (b,) = parse("echo 2 > f")
    assert b.first.commands[0].argv == ("echo", "2") and b.first.commands[0].redirects == (Redirect(1, ">", "f"),)
    (c,) = parse("echo 2>>f")
    assert c.first.commands[0].argv == ("echo",) and c.first.commands[0].redirects == (Redirect(2, ">>", "f"),)


def test_escapes_count_backslashes() -> None:
    """``\\;`` is a literal backslash and then a separator; ``\\\\\\;`` escapes the separator."""
    assert argvs("echo a\\\\; echo b") == [("echo", "a\\"), ("echo", "b")]
    assert argvs("echo a\\\\\\;b") == [("echo", "a\\;b")]
    assert argvs("echo \\&\\& b") == [("echo", "&&", "b")]


def test_newlines_separate_commands_like_semicolons() -> None:
    assert argvs("echo a\necho b") == [("echo", "a"), ("echo", "b")]
    lists = parse("\n\necho a &\n\nfalse ||\n  echo c |\n  cat\n")
    assert [x.background for x in lists] == [True, False]
    assert [[c.argv for c in p.commands] for p in (lists[1].first, lists[1].rest[0][1])] == [
        [("false",)], [("echo", "c"), ("cat",)]]
    assert argvs(fill("echo {v}", v="two\nlines")) == [("echo", "two\nlines")]
    with pytest.raises(ShellSyntaxError):
        parse("echo a\n&& echo b")


@pytest.mark.parametrize("bad", ["a &&", "| a", "a ;; b", "echo 'open", "a >"])
def test_syntax_errors(bad: str) -> None:
    with pytest.raises(ShellSyntaxError):
        parse(bad)


def test_default_templates_parse() -> None:
    from epiconsole.config import CommandsConfig
    from epiconsole.config import fill as cfg_fill

    values = dict(source="/m", experts=2, layers="all", strategy="remove", profile="/p.json", out="/o", converter="/c.py",
                  tokenizer_converter="/t.py", name="drop2_all", files=["/a", "/b"], dest="u@h:/d/", path="/x",
                  port=1, nthreads=4, model="/m.m", tokenizer="/t.t", workers=["h:1", "h:2"], governor="performance")
    for name, template in vars(CommandsConfig()).items():
        needed = {k: v for k, v in values.items() if "{" + k + "}" in template}
        assert isinstance(parse(cfg_fill(template, **needed))[0], AndOr), name


# --------------------------------------------------------------------------------------------------
# The shell on a machine (no SSH)


class Collect(Sink):
    def __init__(self) -> None:
        self.data = b""

    async def write(self, data: bytes) -> None:
        self.data += data

    @property
    def text(self) -> str:
        return self.data.decode()


@pytest.fixture
def lab() -> SimLab:
    return SimLab(sim_config())


def machine(lab: SimLab, tmp_path: Path, name: str = "pi1") -> Machine:
    return Machine(name, lab, tmp_path / "machines", kind="dgx" if name == "dgx" else "pi")


async def sh(m: Machine, command: str, cwd: Path | None = None) -> tuple[int, str, str]:
    out, err = Collect(), Collect()
    status = await Shell(m, cwd).run_script(command, Io(Source(), out, err))
    return status, out.text, err.text


async def test_exit_statuses_and_lists(lab: SimLab, tmp_path: Path) -> None:
    m = machine(lab, tmp_path)
    assert await sh(m, "true && echo yes || echo no") == (0, "yes\n", "")
    assert await sh(m, "false && echo yes || echo no") == (0, "no\n", "")
    assert await sh(m, "false; true") == (0, "", "")
    assert await sh(m, "true; false") == (1, "", "")
    assert await sh(m, "nosuchtool --x") == (127, "", "sh: 1: nosuchtool: not found\n")
    assert await sh(m, "epiconsole --version") == (127, "", "sh: 1: epiconsole: not found\n")  # not on a Pi
    status, _, err = await sh(m, "echo 'unterminated")
    assert status == 2 and err.startswith("sh: 1: Syntax error")


async def test_redirections_write_real_files(lab: SimLab, tmp_path: Path) -> None:
    m = machine(lab, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    assert await sh(m, "echo one > out.txt; echo two >> out.txt; nope 2> err.txt; cat nofile > both.txt 2>&1",
                    work) == (1, "", "")
    assert (work / "out.txt").read_text() == "one\ntwo\n"
    assert (work / "err.txt").read_text() == "sh: 1: nope: not found\n"
    assert (work / "both.txt").read_text() == "cat: nofile: No such file or directory\n"
    # /tmp is private to each machine.
    assert (await sh(m, "echo hi > /tmp/x.log && cat /tmp/x.log"))[:2] == (0, "hi\n")
    assert (tmp_path / "machines" / "pi1" / "tmp" / "x.log").read_text() == "hi\n"
    assert (await sh(machine(lab, tmp_path, "pi2"), "cat /tmp/x.log"))[0] == 1


async def test_pi_health_commands_read_the_lab(lab: SimLab, tmp_path: Path) -> None:
    m = machine(lab, tmp_path, "pi2")
    status, out, _ = await sh(m, lab.cfg.commands.health)
    lines = out.splitlines()
    assert status == 0
    assert lines[0] == f"temp={lab.temperature('pi2'):.1f}'C"
    assert lines[1] == "throttled=0x0"
    assert lines[2] == "frequency(0)=1500000000"  # ondemand and idle
    assert lines[3] == "ondemand"
    assert lines[4].startswith("0.08 0.11 0.09 ")
    lab.faults.node_throttled.add("pi2")
    _, out, _ = await sh(m, "vcgencmd get_throttled")
    assert out == "throttled=0x60006\n"


async def test_governor_write_needs_sudo_and_a_valid_value(lab: SimLab, tmp_path: Path) -> None:
    m = machine(lab, tmp_path)
    path = "/sys/devices/system/cpu/cpufreq/policy*/scaling_governor"
    status, _, err = await sh(m, f"echo performance | tee {path}")
    assert status == 1 and "Permission denied" in err and lab.node("pi1").governor == "ondemand"
    status, _, err = await sh(m, f"echo turbo | sudo tee {path}")
    assert status == 1 and err == "tee: /sys/devices/system/cpu/cpufreq/policy0/scaling_governor: Invalid argument\n"
    assert await sh(m, fill(lab.cfg.commands.set_governor, governor="performance")) == (0, "performance\n", "")
    assert lab.node("pi1").governor == "performance"
    assert (await sh(m, "cat /sys/devices/system/cpu/cpufreq/policy0/scaling_governor"))[1] == "performance\n"


async def test_ds18b20_only_on_the_ambient_host(lab: SimLab, tmp_path: Path) -> None:
    ambient = lab.cfg.cluster.ambient_host
    assert await sh(machine(lab, tmp_path, ambient), lab.cfg.commands.ambient) == (0, "22000\n", "")
    lab.faults.hot_ambient = True
    assert (await sh(machine(lab, tmp_path, ambient), lab.cfg.commands.ambient))[1] == "31000\n"
    status, _, err = await sh(machine(lab, tmp_path, "pi3"), lab.cfg.commands.ambient)
    assert status == 1 and "No such file or directory" in err


async def test_stat_sha256sum_rsync(lab: SimLab, tmp_path: Path) -> None:
    dgx = machine(lab, tmp_path, "dgx")
    src = tmp_path / "dgx-out"
    src.mkdir()
    data = os.urandom(100_000)
    (src / "model.m").write_bytes(data)
    (src / "tok.t").write_bytes(b"tok")
    dest = tmp_path / "pi0-models"
    cmd = fill("rsync -a --partial {files} {dest}", files=[str(src / "model.m"), str(src / "tok.t")],
               dest=f"pi@127.0.0.1:{dest}/")
    assert await sh(dgx, cmd) == (0, "", "")
    assert (dest / "model.m").read_bytes() == data and (dest / "tok.t").read_bytes() == b"tok"
    pi0 = machine(lab, tmp_path, "pi0")
    assert await sh(pi0, f"stat -c %s {dest / 'model.m'}") == (0, "100000\n", "")
    digest = hashlib.sha256(data).hexdigest()
    assert await sh(pi0, f"sha256sum {dest / 'model.m'}") == (0, f"{digest}  {dest / 'model.m'}\n", "")
    status, _, err = await sh(pi0, "stat -c %s /nope")
    assert status == 1 and "cannot statx '/nope'" in err
    lab.faults.node_down.add("pi0")
    status, _, err = await sh(dgx, f"rsync -a {src / 'tok.t'} pi0:{dest}/")
    assert status == 255 and "Connection refused" in err
    status, _, err = await sh(dgx, f"rsync -a {src / 'missing'} {dest}/")
    assert status == 23 and "link_stat" in err


async def test_sleep_and_timeout_use_virtual_time(lab: SimLab, tmp_path: Path) -> None:
    m = machine(lab, tmp_path)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await sh(m, "sleep 60") == (0, "", "")  # 60 virtual s = 0.1 real s at x600
    assert (await sh(m, "timeout 30 sleep 6000"))[0] == 124
    assert (await sh(m, "timeout 600 sleep 6"))[0] == 0
    assert loop.time() - t0 < 30.0  # 96 s of commands in real time; virtual time takes ~0.2 s
    assert m.running() == []


async def test_workers_pkill_is_scoped_to_the_node(lab: SimLab, tmp_path: Path) -> None:
    pi1, pi2 = machine(lab, tmp_path, "pi1"), machine(lab, tmp_path, "pi2")
    start = fill(lab.cfg.commands.start_worker, port=9998, nthreads=4)
    assert await sh(pi1, start) == (0, "", "")
    assert await sh(pi2, start) == (0, "", "")
    await asyncio.sleep(0.01)
    assert lab.node("pi1").worker_running and lab.node("pi2").worker_running
    assert [p.cmdline for p in pi1.running()] == ["dllama worker --port 9998 --nthreads 4"]
    assert "Listening on 0.0.0.0:9998" in (tmp_path / "machines/pi1/tmp/dllama-worker.log").read_text()
    assert await sh(pi1, lab.cfg.commands.stop_worker) == (0, "", "")
    assert await eventually(lambda: not lab.node("pi1").worker_running)
    assert pi1.running() == [] and lab.node("pi2").worker_running
    assert (await sh(pi1, "pkill -f 'dllama worker'"))[0] == 1  # nothing left to match
    await pi2.shutdown()
    assert not lab.node("pi2").worker_running and pi2.jobs == set()


async def test_hangup_kills_unprotected_background_jobs(lab: SimLab, tmp_path: Path) -> None:
    m = machine(lab, tmp_path)
    shell = Shell(m)
    io = Io(Source(), NullSink(), NullSink())
    await shell.run_script("sleep 100000 & setsid sleep 100001 &", io)
    await asyncio.sleep(0.01)
    assert sorted(p.cmdline for p in m.running()) == ["sleep 100000", "sleep 100001"]
    shell.hangup()
    assert await eventually(lambda: [p.cmdline for p in m.running()] == ["sleep 100001"])
    await m.shutdown()
    assert m.running() == []


async def test_hangup_reaches_jobs_of_nested_shells_unless_detached(lab: SimLab, tmp_path: Path) -> None:
    """Without job control a nested ``sh -c 'x &'`` job shares the session's process group; under nohup
    or setsid it ignores the hang-up, as its parent does."""
    m = machine(lab, tmp_path)
    shell = Shell(m)
    io = Io(Source(), NullSink(), NullSink())
    await shell.run_script("sh -c 'sleep 100000 &'; nohup sh -c 'sleep 100001 &'; setsid bash -c 'sleep 100002 &'",
                           io)
    assert await eventually(lambda: len(m.running()) == 3)
    shell.hangup()
    assert await eventually(lambda: sorted(p.cmdline for p in m.running()) == ["sleep 100001", "sleep 100002"])
    await m.shutdown()
    assert m.running() == []


async def test_converters_write_simulated_files(lab: SimLab, tmp_path: Path) -> None:
    dgx = machine(lab, tmp_path, "dgx")
    out = tmp_path / "drop3_late"
    out.mkdir()
    (out / "config.json").write_text("{}")
    manifest = {"request": {"experts": 3, "layers": "late", "strategy": "zero"}, "strategy": "zero",
                "profile": {"model": "Qwen3-30B-A3B"}}
    (out / "epi-surgery.json").write_text(json.dumps(manifest))
    cmd = fill(lab.cfg.commands.convert, out=str(out), converter="/opt/dl/converter/convert-hf.py",
               tokenizer_converter="/opt/dl/converter/convert-tokenizer-hf.py", name="drop3_late")
    status, stdout, err = await sh(dgx, cmd)
    assert (status, err) == (0, "") and "simulated" in stdout
    assert read_model_file(out / "dllama_model_drop3_late_q40.m") == Deployed("drop3_late", experts=3, target="late",
                                                                               strategy="zero")
    assert (out / "dllama_tokenizer_drop3_late.t").read_bytes().startswith(b"#SIMULATED")
    base = tmp_path / "baseline"
    base.mkdir()
    (base / "config.json").write_text("{}")
    assert (await sh(dgx, f"cd {base} && python3 /x/convert-hf.py . q40 baseline"))[0] == 0
    assert read_model_file(base / "dllama_model_baseline_q40.m") == Deployed("baseline")
    status, _, err = await sh(dgx, f"cd {tmp_path} && python3 /x/convert-hf.py . q40 nothing-here")
    assert status == 1 and "config.json" in err
    assert (await sh(dgx, "python3 /x/other.py"))[0] == 2


async def test_dllama_api_refuses_bad_models_and_missing_workers(lab: SimLab, tmp_path: Path) -> None:
    pi0 = machine(lab, tmp_path, "pi0")
    real = tmp_path / "real.m"
    real.write_bytes(b"\x00" * 1000)
    tok = tmp_path / "tok.t"
    tok.write_bytes(b"t")
    template = lab.cfg.commands.start_root.replace(" > /tmp/dllama-api.log 2>&1 < /dev/null &", "")
    status, _, err = await sh(pi0, fill(template, port=1, model=str(real), tokenizer=str(tok), nthreads=4, workers=[]))
    assert status == 1 and "not a simulated dllama model file" in err
    sim_model = write_model_file(tmp_path / "m.m", Deployed("baseline"))
    status, _, err = await sh(pi0, fill(template, port=1, model=str(sim_model), tokenizer=str(tok), nthreads=4,
                                        workers=[]))
    assert status == 1 and "Cannot connect to worker on pi1" in err
    assert lab.deployed is None


async def test_epiconsole_runs_the_real_cli(lab: SimLab, tmp_path: Path) -> None:
    from epiconsole import __version__

    dgx = machine(lab, tmp_path, "dgx")
    assert await sh(dgx, "epiconsole --version") == (0, f"epiconsole {__version__}\n", "")


# --------------------------------------------------------------------------------------------------
# The SSH servers


async def test_start_writes_keys_and_known_hosts(sim_hosts: SimHosts) -> None:  # noqa: F811
    sim = sim_hosts.sim
    assert set(sim.ports) == {"dgx", "pi0", "pi1", "pi2", "pi3"}
    assert stat.S_IMODE(sim.client_key.stat().st_mode) == 0o600
    lines = sim.known_hosts.read_text().splitlines()
    assert len(lines) == 5
    for line, (name, port) in zip(lines, sim.ports.items(), strict=True):
        host, kind, _key = line.split()
        assert host == f"[127.0.0.1]:{port}" and kind == "ssh-ed25519"
        assert sim.host_keys[name].export_public_key().split()[1] == line.split()[2].encode()


async def test_only_the_lab_client_key_is_accepted(sim_hosts: SimHosts, tmp_path: Path) -> None:  # noqa: F811
    other = asyncssh.generate_private_key("ssh-ed25519")
    other.write_private_key(tmp_path / "other_key")
    os.chmod(tmp_path / "other_key", 0o600)
    pool = SshPool({"pi1": sim_hosts.target("pi1", key=str(tmp_path / "other_key"))})
    with pytest.raises(AuthRefused, match="refused our key"):
        await pool.run("pi1", "true")
    await pool.close()
    # And no password is ever offered or accepted.
    with pytest.raises(asyncssh.PermissionDenied):
        t = sim_hosts.targets["pi1"]
        await asyncssh.connect("127.0.0.1", t.port, username="pi", password="raspberry", known_hosts=t.known_hosts,
                               client_keys=None, agent_path=None)


async def test_node_down_refuses_and_drops_connections(sim_hosts: SimHosts) -> None:  # noqa: F811
    pool, lab = sim_hosts.pool, sim_hosts.lab
    assert (await pool.run("pi3", "echo up")).stdout == "up\n"
    lab.faults.node_down.add("pi3")
    with pytest.raises(HostUnreachable, match="cannot reach pi3"):
        await pool.run("pi3", "echo again")
    lab.faults.node_down.discard("pi3")
    assert (await pool.run("pi3", "echo back")).stdout == "back\n"


async def test_closed_channel_kills_the_foreground_command(sim_hosts: SimHosts) -> None:  # noqa: F811
    t = sim_hosts.targets["dgx"]
    async with asyncssh.connect("127.0.0.1", t.port, username=t.user, client_keys=[t.key],
                                known_hosts=t.known_hosts) as conn:
        proc = await conn.create_process("sleep 1000000 && echo never")
        assert await eventually(lambda: sim_hosts.sim.running("dgx") == ["bash -c sleep 1000000 && echo never",
                                                                         "sleep 1000000"])
        proc.close()
        assert await eventually(lambda: sim_hosts.sim.running("dgx") == [])
        assert not sim_hosts.sim._tasks or await eventually(lambda: not sim_hosts.sim._tasks)


async def test_pkill_matches_the_login_shell_like_on_a_pi(sim_hosts: SimHosts) -> None:  # noqa: F811
    """``bash -c "pkill -f 'dllama worker' || true"`` kills its own shell on real hardware; so here."""
    pool, lab = sim_hosts.pool, sim_hosts.lab
    await pool.run("pi1", fill(lab.cfg.commands.start_worker, port=9998, nthreads=4), check=True)
    assert await eventually(lambda: lab.node("pi1").worker_running)
    res = await pool.run("pi1", "pkill -f 'dllama worker' || true")
    assert (res.exit_status, res.exit_signal) == (None, "TERM")
    assert await eventually(lambda: not lab.node("pi1").worker_running)
    await pool.run("pi1", fill(lab.cfg.commands.start_worker, port=9998, nthreads=4), check=True)
    assert await eventually(lambda: lab.node("pi1").worker_running)
    res = await pool.run("pi1", "pkill -f '[d]llama worker' || true")
    assert (res.exit_status, res.exit_signal) == (0, None)
    assert await eventually(lambda: not lab.node("pi1").worker_running)
    assert sim_hosts.sim.running("pi1") == []


async def test_pty_sessions_merge_stderr_with_crlf(sim_hosts: SimHosts) -> None:  # noqa: F811
    t = sim_hosts.targets["pi0"]
    async with asyncssh.connect("127.0.0.1", t.port, username=t.user, client_keys=[t.key],
                                known_hosts=t.known_hosts) as conn:
        result = await conn.run("echo out; nope", term_type="dumb")
        assert result.stdout == "out\r\nsh: 1: nope: not found\r\n" and result.exit_status == 127
        result = await conn.run("echo out; nope")
        assert (result.stdout, result.stderr) == ("out\n", "sh: 1: nope: not found\n")


async def test_stop_kills_daemons(tmp_path: Path) -> None:
    from epiconsole.sim.ssh import SimSSH
    from tests.ssh_fixtures import targets_for

    lab = SimLab(sim_config())
    sim = SimSSH(lab, tmp_path)
    targets = targets_for(sim, await sim.start())
    pool = SshPool(targets)
    await pool.run("pi1", fill(lab.cfg.commands.start_worker, port=9998, nthreads=4), check=True)
    assert await eventually(lambda: lab.node("pi1").worker_running)
    await pool.close()
    await sim.stop()
    assert not lab.node("pi1").worker_running
    assert all(m.running() == [] and not m.jobs for m in sim.machines.values())


async def test_client_key_replaces_a_planted_file_instead_of_writing_through_it(tmp_path: Path) -> None:
    """A symlink (or a world-readable file) at the key's path never receives the new private key."""
    from epiconsole.sim.ssh import SimSSH

    victim = tmp_path / "victim"
    victim.write_text("not a key\n")
    os.chmod(victim, 0o644)
    (tmp_path / "id_ed25519").symlink_to(victim)
    sim = SimSSH(SimLab(sim_config()), tmp_path)
    await sim.start()
    try:
        key = sim.client_key
        assert not key.is_symlink() and stat.S_IMODE(key.stat().st_mode) == 0o600
        assert victim.read_text() == "not a key\n"
        assert key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    finally:
        await sim.stop()

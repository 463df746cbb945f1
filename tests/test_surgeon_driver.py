"""The surgeon driver against the simulated DGX: the real surgeon CLI runs over SSH, its JSON-lines progress
comes back as typed events, and a cancelled job leaves no process (handler task or OS subprocess)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from drivers.cluster import Cluster
from drivers.surgeon import Surgeon, SurgeonEvent, parse_event
from epiconsole.sim.modelfile import read_model_file
from epiconsole.sim.physics import Deployed
from tests.ssh_fixtures import SimHosts, eventually, sim_hosts  # noqa: F401  (fixture)


def templates(h: SimHosts, **changes: str) -> dict[str, str]:
    return {**dataclasses.asdict(h.cfg.commands), **changes}


def test_parse_event() -> None:
    assert parse_event('{"event":"tensor","done":3,"total":40}') == SurgeonEvent(
        "tensor", {"event": "tensor", "done": 3, "total": 40}, '{"event":"tensor","done":3,"total":40}')
    assert parse_event("💿 Chunking model 1/16...").kind == "log"
    assert parse_event("{not json").kind == "log"
    assert parse_event('{"no_event": 1}').kind == "log"
    assert parse_event('{"event":"error","message":"boom"}').message == "boom"


async def test_surgery_convert_push_deploy(sim_hosts: SimHosts) -> None:  # noqa: F811
    h = sim_hosts
    work = h.dir / "dgx"
    src, profile, out = work / "src", work / "profile.json", work / "drop2_all"
    synth = await h.pool.run("dgx", f"epiconsole surgeon synth {src} --layers 4 --experts 8 --profile {profile}",
                             check=True)
    assert synth.ok and (src / "config.json").is_file()
    # Validation with generation needs transformers; the structural check is what runs here.
    surgeon = Surgeon(h.pool, templates(h, validate="epiconsole surgeon validate {out} --no-generate --json"))

    events = []
    async with surgeon.surgery(source=str(src), experts=2, layers="all", strategy="remove", profile=str(profile),
                               out=str(out)) as job:
        async for event in job:
            events.append(event)
        result = await job.result()
    kinds = [e.kind for e in events]
    assert "tensor" in kinds and kinds[-1] == "done", kinds
    tensors = [e.data for e in events if e.kind == "tensor"]
    assert tensors[-1]["done"] == tensors[-1]["total"]
    assert result.ok and result.exit_status == 0 and result.last_event == events[-1]
    assert (out / "epi-surgery.json").is_file()

    result = await surgeon.validate(out=str(out)).result()
    assert result.ok, result

    convert = surgeon.convert(out=str(out), converter="/opt/distributed-llama/converter/convert-hf.py",
                              tokenizer_converter="/opt/distributed-llama/converter/convert-tokenizer-hf.py",
                              name="drop2_all")
    logs = [e.line async for e in convert if e.kind == "log"]
    assert (await convert.result()).ok and any("simulated" in line for line in logs)
    model, tok = out / "dllama_model_drop2_all_q40.m", out / "dllama_tokenizer_drop2_all.t"
    assert read_model_file(model) == Deployed("drop2_all", experts=2, target="all", strategy="remove")

    dest = h.dir / "pi0" / "models"
    dest.mkdir(parents=True)
    push = await surgeon.push(files=[str(model), str(tok)], dest=f"{h.targets['pi0'].user}@127.0.0.1:{dest}/").result()
    assert push.ok and (dest / model.name).read_bytes() == model.read_bytes()
    c = h.cfg.cluster
    checks = await Cluster(h.pool, templates(h), nodes=c.nodes, root=c.root).copy_and_verify(
        "dgx", [str(model), str(tok)], "pi0", str(dest))
    assert all(check.ok for check in checks)


async def test_error_event_exit_status_and_stderr_tail(sim_hosts: SimHosts) -> None:  # noqa: F811
    surgeon = Surgeon(sim_hosts.pool, templates(sim_hosts))
    job = surgeon.surgery(source=str(sim_hosts.dir / "missing"), experts=1, layers="all", strategy="remove",
                          profile=str(sim_hosts.dir / "p.json"), out=str(sim_hosts.dir / "o"))
    result = await job.result()
    assert not result.ok and result.exit_status not in (0, None)
    assert result.last_event is not None and result.last_event.kind == "error"
    assert result.error == result.last_event.message and result.error
    # Non-JSON output is kept as the tail (the pty merges the remote stderr into it).
    bad = Surgeon(sim_hosts.pool, templates(sim_hosts, validate="nosuchtool {out}"))
    result = await bad.validate(out="/x").result()
    assert result.exit_status == 127 and result.stderr_tail == ("sh: 1: nosuchtool: not found",)
    assert result.error == "sh: 1: nosuchtool: not found"


async def test_cancel_kills_the_remote_cli(sim_hosts: SimHosts, tmp_path: Path) -> None:  # noqa: F811
    """A long surgeon-side command (here ``epiconsole sim``, which runs until stopped) is killed on cancel:
    no handler task on the simulated DGX and no OS process left."""
    dgx = sim_hosts.sim.machines["dgx"]
    surgeon = Surgeon(sim_hosts.pool, templates(sim_hosts, validate="epiconsole sim --dir {out} --time-scale 600"))
    job = surgeon.validate(out=str(tmp_path / "nested-lab"), timeout=60)
    async with job:
        async for event in job:
            if event.line.endswith("lab.toml"):
                break
        procs = dgx.running()
        assert [p.cmdline.split()[:2] for p in procs] == [["epiconsole", "sim"]]
        pid = procs[0].os_pid
        assert pid is not None and _alive(pid)
    result = await job.result()
    assert result.cancelled and not result.ok
    assert await eventually(lambda: dgx.running() == [] and not _alive(pid), timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(("dest", "files"), [
    ("pi@10.0.0.10:/home/pi/my models/", ["/w/m.m"]),
    ("pi@10.0.0.10:/home/pi/$(reboot)/", ["/w/m.m"]),
    ("pi@10.0.0.10:/home/pi/models/", ["-e sh x.sh"]),
    ("-oProxyCommand=x@h:/d/", ["/w/m.m"]),
])
def test_push_refuses_what_the_remote_shell_would_interpret(dest: str, files: list[str]) -> None:
    from drivers.cluster import UnsafeRemotePath
    from drivers.ssh import SshPool, SshTarget

    surgeon = Surgeon(SshPool({"dgx": SshTarget("dgx", "127.0.0.1")}), {n: "true" for n in
                                                                          ("surgery", "validate", "convert", "push")})
    with pytest.raises(UnsafeRemotePath):
        surgeon.push(files=files, dest=dest)
    assert surgeon.push(files=["/w/m.m"], dest="pi@10.0.0.10:/home/pi/models/").command == "true"


@pytest.mark.parametrize("template", ["surgery", "validate", "convert", "push"])
def test_missing_templates_are_named(template: str) -> None:
    from drivers.ssh import SshPool, SshTarget

    pool = SshPool({"dgx": SshTarget("dgx", "127.0.0.1")})
    names = {"surgery", "validate", "convert", "push"} - {template}
    with pytest.raises(KeyError, match=template):
        Surgeon(pool, {n: "true" for n in names})

"""Start and stop a whole simulated lab, and hand out a lab config that points at it.

``SimulatedLab.start()`` builds the lab's world in a directory (a tiny Qwen3-MoE checkpoint and its
router profile on the simulated DGX, model directories on the simulated Pis), starts the simulated meter
on a pseudo-terminal and the SSH servers on 127.0.0.1, and returns a :class:`LabConfig` whose every host,
port, key and path points at them. The same config is written to ``<dir>/lab.toml``, so another process
(``epiconsole --config <dir>/lab.toml``) treats the simulated lab exactly like a real one. The simulated
root node starts its dllama-api when the engine deploys a model, as the real one does.
"""

from __future__ import annotations

import dataclasses
import getpass
import socket
import tempfile
from pathlib import Path

from epiconsole import config as cfgmod
from epiconsole.config import LabConfig
from epiconsole.errors import UserError
from epiconsole.sim.shell import MODEL_LOAD_S
from epiconsole.sim.state import SimLab

#: The simulated DGX's source model: a tiny Qwen3-MoE with the real layout (per-expert tensors,
#: router rows), so the real surgeon toolkit runs on it. 16 experts leave 8 after the deepest drop.
TINY_MODEL = {"layers": 8, "experts": 16, "top_k": 2, "shards": 2}

#: The benchmark suite of the simulated lab: our own small local task files (see
#: epiconsole/benchmark/tasks), few-shot kept small so simulated prompts stay short.
SIM_TASKS = (
    cfgmod.TaskConfig("epi_mmlu_local", shots=2),
    cfgmod.TaskConfig("epi_arc_local", shots=2),
    cfgmod.TaskConfig("epi_hellaswag_local", shots=1),
)


class SimStartError(UserError):
    """The simulated lab could not start for a reason the user can fix (said in the message)."""


#: The simulated lab's pace when the config leaves it at the defaults (see :func:`tuned_config`).
SIM_TIME_SCALE = 150.0
SIM_METER_HZ = 1.25


def tuned_config(base: LabConfig) -> LabConfig:
    """The config of a simulated lab tuned for quick matrices; anything the config sets explicitly is kept.

    * ``time_scale`` 150 (when left at the default 60): a repetition's 60 s of stabilization and
      ~90 s of simulated inference take about a second.
    * meter ``rate_hz`` 1.25 (when left at the default 10): the device still samples every 0.8 s of its
      own time, inside the 1 s gap limit, but writes 190 lines per real second instead of 1500.
    * ``validate`` skips the sample generation (``--no-generate``): it would import torch, ~7 s per
      configuration; the structural, manifest and NaN/Inf checks still run on every model.
    * the benchmark suite: our three small local tasks when the tasks are the defaults (the public
      datasets are not on this machine), 5 items each when no limit is set.
    The real lab's defaults stay as designed. Applying it twice changes nothing.
    """
    defaults = cfgmod.LabConfig()
    validate = base.commands.validate
    if "--no-generate" not in validate and validate.startswith("epiconsole surgeon validate"):
        validate += " --no-generate"
    sim = base.sim
    if sim.time_scale == defaults.sim.time_scale:
        sim = dataclasses.replace(sim, time_scale=SIM_TIME_SCALE)
    meter = base.meter
    if meter.rate_hz == defaults.meter.rate_hz:
        meter = dataclasses.replace(meter, rate_hz=SIM_METER_HZ)
    bench = base.benchmark
    if bench.tasks == defaults.benchmark.tasks:
        max_tokens = 4 if bench.max_tokens == defaults.benchmark.max_tokens else bench.max_tokens
        bench = dataclasses.replace(bench, tasks=SIM_TASKS, max_tokens=max_tokens)
    if bench.limit == defaults.benchmark.limit:
        bench = dataclasses.replace(bench, limit=5)
    return dataclasses.replace(
        base,
        lab=dataclasses.replace(base.lab, simulated=True),
        commands=dataclasses.replace(base.commands, validate=validate),
        sim=sim,
        meter=meter,
        benchmark=bench,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimulatedLab:
    """One running simulated lab. Use as ``async with SimulatedLab(base) as lab: cfg = lab.config``."""

    def __init__(self, base: LabConfig | None = None, directory: str | Path | None = None) -> None:
        self.base = base or cfgmod.sim_defaults()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="epiconsole-simlab-")
            directory = self._tmp.name
        self.dir = Path(directory)
        self.state: SimLab | None = None
        self.meter = None
        self.ssh = None
        self.config: LabConfig | None = None
        self.config_path = self.dir / "lab.toml"

    async def __aenter__(self) -> SimulatedLab:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _build_world(self) -> dict[str, Path]:
        from epiconsole.surgeon import synth

        dgx = self.dir / "dgx"
        source = dgx / "models" / "Qwen3-30B-A3B-tiny"
        profile = dgx / "profiles" / "Qwen3-30B-A3B-tiny.json"
        work = dgx / "work"
        models = self.dir / "pi0" / "models"
        for d in (work, models, profile.parent):
            d.mkdir(parents=True, exist_ok=True)
        if not (source / "config.json").exists():
            synth.make_tiny_checkpoint(source, seed=self.base.sim.seed, **TINY_MODEL)
        if not profile.exists():
            import json

            profile.write_text(json.dumps(synth.make_profile(source, seed=self.base.sim.seed)))
        return {"source": source, "profile": profile, "work": work, "models": models}

    async def start(self) -> LabConfig:
        """Start everything; on any failure stop what already runs (``async with`` never reaches its exit).

        A failure a user can cause (a command template that does not boot the cluster, an unwritable
        directory) becomes a :class:`SimStartError` sentence instead of a traceback."""
        from drivers.cluster import ApiNotReady, SensorError
        from drivers.ssh import SshError

        try:
            return await self._start()
        except (SshError, ApiNotReady, SensorError, OSError) as exc:
            await self.stop()
            raise SimStartError(f"the simulated lab in {self.dir} did not start: {str(exc).rstrip('.')}.") from exc
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> LabConfig:
        from epiconsole.sim.meter import SimMeter
        from epiconsole.sim.ssh import SimSSH

        self.dir.mkdir(parents=True, exist_ok=True)
        world = self._build_world()
        base = tuned_config(self.base)
        self.state = SimLab(base)
        self.meter = SimMeter(self.state, rate_hz=base.meter.rate_hz, dir=self.dir)
        port_path = await self.meter.start()
        self.ssh = SimSSH(self.state, self.dir)
        ports = await self.ssh.start()
        user = getpass.getuser()
        hosts = {
            name: cfgmod.HostConfig(
                address="127.0.0.1",
                port=port,
                user=user,
                key=str(self.dir / "id_ed25519"),
                known_hosts=str(self.dir / "known_hosts"),
                connect_timeout_s=5.0,
                command_timeout_s=60.0,
            )
            for name, port in ports.items()
        }
        self.config = dataclasses.replace(
            base,
            lab=dataclasses.replace(base.lab, simulated=True, name=base.lab.name or "simulated lab"),
            meter=dataclasses.replace(base.meter, port=port_path),
            hosts=hosts,
            cluster=dataclasses.replace(
                base.cluster, api_host="127.0.0.1", api_port=free_port(), model_dir=str(world["models"]),
                # The simulated model load takes MODEL_LOAD_S lab seconds; give it that in real time, twice.
                api_ready_timeout_s=30.0 + 2 * MODEL_LOAD_S / base.sim.time_scale, api_timeout_s=60.0,
            ),
            surgery=dataclasses.replace(
                base.surgery, model="Qwen3-30B-A3B", source=str(world["source"]), profile=str(world["profile"]),
                work_dir=str(world["work"]),
            ),
            source=str(self.config_path),
        )
        cfgmod.validate(self.config)
        await self._boot_cluster(world["models"])
        self.config_path.write_text(
            "# A lab config pointing at a running simulated lab (written by epiconsole).\n" + cfgmod.dumps(self.config)
        )
        return self.config

    async def _boot_cluster(self, models: Path) -> None:
        """The simulated cluster comes up serving the unmodified model, as a lab's cluster usually is.

        Started through the real drivers over SSH, so the lab is booted the way the engine deploys."""
        from epiconsole import labdrivers
        from epiconsole.sim.modelfile import write_model_file
        from epiconsole.sim.physics import Deployed

        assert self.config is not None
        model = write_model_file(models / "dllama_model_baseline_q40.m", Deployed(config_id="baseline"))
        tokenizer = models / "dllama_tokenizer_baseline.t"
        tokenizer.write_bytes(b"#SIMULATED-DLLAMA-TOKENIZER v1\n")
        pool = labdrivers.ssh_pool(self.config)
        try:
            cluster = labdrivers.cluster(self.config, pool)
            await cluster.start_workers()
            await cluster.start_root(str(model), str(tokenizer))
            await cluster.wait_api_ready(timeout=self.config.cluster.api_ready_timeout_s, interval=0.05)
        finally:
            await pool.close()

    async def stop(self) -> None:
        if self.ssh is not None:
            await self.ssh.stop()
            self.ssh = None
        if self.meter is not None:
            await self.meter.stop()
            self.meter = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

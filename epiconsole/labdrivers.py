"""Build the drivers from a lab config: the one place that maps config sections onto driver values."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from epiconsole.config import LabConfig

if TYPE_CHECKING:
    from drivers.cluster import Cluster
    from drivers.dllama_api import DllamaApi
    from drivers.epimeter import EpiMeter
    from drivers.ssh import SshPool, SshTarget
    from drivers.surgeon import Surgeon


def ssh_targets(cfg: LabConfig) -> dict[str, SshTarget]:
    from drivers.ssh import SshTarget

    return {name: SshTarget(name=name, **dataclasses.asdict(h)) for name, h in cfg.hosts.items()}


def ssh_pool(cfg: LabConfig) -> SshPool:
    from drivers.ssh import SshPool

    return SshPool(ssh_targets(cfg))


def templates(cfg: LabConfig) -> dict[str, str]:
    return dataclasses.asdict(cfg.commands)


def cluster(cfg: LabConfig, pool: SshPool) -> Cluster:
    from drivers.cluster import Cluster

    c = cfg.cluster
    return Cluster(pool, templates(cfg), nodes=c.nodes, root=c.root, worker_port=c.worker_port,
                   api_port=c.api_port, nthreads=c.nthreads, ambient_host=c.ambient_host, api_host=c.api_host)


def surgeon(cfg: LabConfig, pool: SshPool) -> Surgeon:
    from drivers.surgeon import Surgeon

    return Surgeon(pool, templates(cfg), host="dgx")


def meter(cfg: LabConfig) -> EpiMeter:
    from drivers.epimeter import EpiMeter

    return EpiMeter(cfg.meter.port, cfg.meter.baud, reconnect_max_s=cfg.meter.reconnect_max_s)


def api_url(cfg: LabConfig) -> str:
    host = cfg.cluster.api_host or cfg.hosts[cfg.cluster.root].address
    return f"http://{host}:{cfg.cluster.api_port}"


def api(cfg: LabConfig, timeout_s: float | None = None) -> DllamaApi:
    from drivers.dllama_api import DllamaApi

    return DllamaApi(api_url(cfg), timeout_s=timeout_s or cfg.cluster.api_timeout_s)

"""Fixtures for the benchmark path: a simulated lab with a model deployed and its dllama-api on loopback."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator

import pytest

from epiconsole import config
from epiconsole.config import LabConfig
from epiconsole.sim.api import SimApi
from epiconsole.sim.physics import Deployed, Physics, PhysicsParams
from epiconsole.sim.state import SimLab

#: Fast virtual time: a benchmark request's seconds of cluster time pass in well under a millisecond.
FAST_SCALE = 1e5


def lab_config(seed: int = 42, time_scale: float = FAST_SCALE, **faults: float) -> LabConfig:
    cfg = config.sim_defaults()
    sim = dataclasses.replace(cfg.sim, seed=seed, time_scale=time_scale,
                              faults=dataclasses.replace(cfg.sim.faults, **faults))
    return dataclasses.replace(cfg, sim=sim)


BASELINE = Deployed("baseline")


def make_lab(seed: int = 42, deployed: Deployed | None = BASELINE, **faults: float) -> SimLab:
    lab = SimLab(lab_config(seed, **faults))
    lab.deployed = deployed
    return lab


def set_accuracy(lab: SimLab, value: float) -> None:
    """Give every task the same simulated accuracy (for answer tests that must not depend on chance)."""
    params = dataclasses.replace(lab.physics.p, base_accuracy=tuple((k, value) for k, _ in lab.physics.p.base_accuracy),
                                 default_accuracy=value)
    lab.physics = Physics(lab.physics.seed, params)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(name="lab")
def lab_fixture() -> SimLab:
    return make_lab()


@pytest.fixture(name="sim_api")
async def sim_api_fixture(lab: SimLab) -> AsyncIterator[SimApi]:
    api = SimApi(lab)
    await api.start(0)
    try:
        yield api
    finally:
        await api.stop()


__all__ = ["BASELINE", "FAST_SCALE", "PhysicsParams", "free_port", "lab_config", "lab_fixture", "make_lab",
           "set_accuracy", "sim_api_fixture"]

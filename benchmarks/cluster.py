"""The swarm on 2 Dask workers (a LocalCluster with mutual TLS) against ``--processes 2``: same
devices, same broker, same run; the two alternate for ``ROUNDS`` rounds (a 2-core machine's
figures move by a quarter from one run to the next), and the means are compared."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from broker import launched_broker
from device.cluster import run_swarm_on_cluster
from device.stats import SwarmStats
from device.swarm import SwarmConfig, run_swarm
from fleet import FleetConfig, ProvisionSpec, Workspace, init_workspace, provision_devices
from fleet.store.cluster_certs import issue_cluster_certificates


@dataclass(frozen=True, slots=True)
class RunFigures:
    runner: str
    devices: int
    connected: int
    connect_rate: float  # connects per second while ramping
    message_rate: float  # QoS 1 messages acknowledged per second over the run
    lost: int


ROUNDS = 2


@dataclass(frozen=True, slots=True)
class ClusterReport:
    runs: list[RunFigures]  # in the order they ran

    def mean(self, runner: str, figure: str) -> float:
        values: list[float] = [getattr(r, figure) for r in self.runs if r.runner == runner]
        return sum(values) / len(values)


PROCESSES = "--processes 2"
DASK = "2 Dask workers (TLS)"


def _figures(runner: str, stats: SwarmStats) -> RunFigures:
    connected = stats.attempts.get("connected", 0)
    ramp = stats.ramp_seconds or stats.elapsed
    return RunFigures(
        runner=runner,
        devices=stats.devices,
        connected=stats.connected_at_deadline,
        connect_rate=connected / ramp if ramp else 0.0,
        message_rate=stats.acknowledged / stats.elapsed if stats.elapsed else 0.0,
        lost=stats.lost,
    )


def run(base: Path, *, devices: int, duration: float) -> ClusterReport:
    from distributed import Client

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    init_workspace(base / "fleet", config=FleetConfig())
    workspace = Workspace.open(base / "fleet")
    ids = provision_devices(workspace, ProvisionSpec(count=devices)).device_ids
    files = issue_cluster_certificates(workspace, base / "certs")
    with launched_broker(workspace.paths.root) as broker:
        config = SwarmConfig(
            workspace=workspace.paths.root,
            device_ids=tuple(ids),
            port=broker.port,
            ramp_per_second=2000.0,  # more than two cores can do: the runner's own limit shows
            publish_every=1.0,
            qos=1,
            duration=duration,
        )
        runs = []
        with (
            files.local_cluster() as cluster,
            Client(cluster.scheduler_address, security=files.security()) as client,
        ):
            for _ in range(ROUNDS):
                runs.append(_figures(PROCESSES, run_swarm(config, processes=2)))
                runs.append(_figures(DASK, run_swarm_on_cluster(config, client).stats))
    return ClusterReport(runs)

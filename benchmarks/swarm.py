"""Swarm benchmarks: 10,000 devices held on the embedded broker, and connect churn of our
device client against Mosquitto beside ``openssl s_time -new`` in the same run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.broker import _rss_bytes, _run, mosquitto, ours
from benchmarks.mqtt_load import (
    PINGREQ,
    device_context,
    open_session,
    percentile,
    puback_for,
    publish_payload,
    read_packet,
    subscribe_packet,
)
from device import Device, DeviceSettings, PahoDriver
from device.handshake_bench import BenchSettings, Identity, STimeResult, openssl_s_time
from device.stats import SwarmStats
from device.swarm import SwarmConfig, run_swarm, split
from fleet import (
    FleetConfig,
    ProvisionSpec,
    Workspace,
    WorkspacePaths,
    init_workspace,
    provision_devices,
)


def _shard_pids() -> list[int]:
    """This process's spawned shard processes (not multiprocessing's resource tracker)."""
    me = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


class _Probe(threading.Thread):
    """A silver device subscribed to every device's telemetry, timing each message's trip."""

    def __init__(self, workspace: Workspace, device_id: str, port: int) -> None:
        super().__init__(daemon=True)
        paths = workspace.paths
        self.context = device_context(
            paths.root_cert, paths.device_cert(device_id), paths.device_key(device_id)
        )
        self.device_id = device_id
        self.port = port
        self.samples: list[float] = []
        self.ready = threading.Event()
        self._stop_requested = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        reader, writer = await open_session("127.0.0.1", self.port, self.context, self.device_id)
        writer.write(subscribe_packet("devices/+/telemetry"))
        await read_packet(reader)
        self.ready.set()

        async def receive() -> None:  # never cancelled mid-packet: it runs until the end
            while True:
                first, body = await read_packet(reader)
                if first >> 4 == 3:
                    qos = (first >> 1) & 0x03
                    if qos:  # a subscriber that never acks stalls the broker
                        writer.write(puback_for(body))
                    sent = json.loads(publish_payload(body, qos))["ts"]
                    self.samples.append(time.time() - sent)

        receiver = asyncio.create_task(receive())
        while not self._stop_requested.is_set() and not receiver.done():
            writer.write(PINGREQ)  # keep alive, whatever the traffic
            await asyncio.sleep(0.5)
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver  # a failure of the probe is raised here, never swallowed
        writer.close()

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(10)


@dataclass
class HeldSwarmFigure:
    devices: int
    connected: int
    ramp_rate: float
    swarm_kb_per_device: float
    broker_kb_per_device: float
    round_trip_p99_ms: float
    sent: int
    lost: int


def held_swarm(
    workspace: Workspace, device_ids: list[str], probe_id: str, *, duration: float
) -> HeldSwarmFigure:
    with ours(workspace) as broker:
        probe = _Probe(workspace, probe_id, broker.port)
        probe.start()
        probe.ready.wait(30)
        baseline = _rss_bytes(broker.pid)
        peak = {"swarm": 0, "broker": 0}
        swarm_baseline: list[int] = []

        def sample(stats: SwarmStats) -> None:
            swarm_rss = sum(_rss_bytes(pid) for pid in _shard_pids())
            if not swarm_baseline:  # the shard interpreters before their devices connect
                swarm_baseline.append(swarm_rss)
            peak["swarm"] = max(peak["swarm"], swarm_rss)
            peak["broker"] = max(peak["broker"], _rss_bytes(broker.pid))

        config = SwarmConfig(
            workspace=workspace.paths.root,
            device_ids=tuple(device_ids),
            port=broker.port,
            ramp_per_second=300.0,
            publish_every=10.0,
            qos=1,
            duration=duration,
            max_in_flight=100,
        )
        stats = run_swarm(config, on_progress=sample)
        probe.stop()
    summary = stats.summary()
    devices = len(device_ids)
    return HeldSwarmFigure(
        devices=devices,
        connected=summary["connected_at_deadline"],
        ramp_rate=summary["ramp_rate"] or 0.0,
        swarm_kb_per_device=(peak["swarm"] - swarm_baseline[0]) / devices / 1024,
        broker_kb_per_device=(peak["broker"] - baseline) / devices / 1024,
        round_trip_p99_ms=percentile(probe.samples, 0.99) * 1000,
        sent=summary["messages"]["sent"],
        lost=summary["messages"]["lost"],
    )


# -- churn: our device client against openssl s_time ---------------------------------------


def _churn_shard(
    workspace_root: str,
    device_ids: tuple[str, ...],
    port: int,
    seconds: float,
    results: Any,
) -> None:
    async def main() -> tuple[int, float]:
        paths = WorkspacePaths(Path(workspace_root))
        driver = PahoDriver()
        settings = [
            DeviceSettings(d, paths.device_cert(d), paths.device_key(d), paths.root_cert, port=port)
            for d in device_ids
        ]
        contexts = [Device(s, driver).context() for s in settings]  # prepared off the clock
        cpu_started = time.process_time()
        deadline = time.perf_counter() + seconds
        done = 0
        next_index = 0

        async def worker() -> None:
            nonlocal done, next_index
            while time.perf_counter() < deadline:
                index = next_index % len(settings)
                next_index += 1
                device = Device(settings[index], driver, context=contexts[index])
                attempt = await device.connect()
                if attempt.outcome.value == "connected":
                    done += 1
                await device.close(ack_grace=0)

        await asyncio.gather(*(worker() for _ in range(25)))
        return done, time.process_time() - cpu_started

    results.put(_run(main()))  # on uvloop, as the swarm's shards run


def device_churn_rate(
    workspace: Workspace, device_ids: list[str], port: int, *, seconds: float, processes: int
) -> tuple[float, float]:
    """Our devices' connects per second (TLS + CONNECT/CONNACK + DISCONNECT, each device's TLS
    context prepared beforehand) and the shards' CPU per connect."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(
            target=_churn_shard, args=(str(workspace.paths.root), ids, port, seconds, results)
        )
        for ids in split(device_ids, processes)
    ]
    for worker in workers:
        worker.start()
    shards = [results.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(10)
    done = sum(connects for connects, _ in shards)
    return done / seconds, sum(cpu for _, cpu in shards) / max(1, done)


def _s_time(
    workspace: Workspace, device_id: str, port: int, *, seconds: float, processes: int
) -> STimeResult | None:
    paths = workspace.paths
    settings = BenchSettings(host="127.0.0.1", port=port, trust_anchor=paths.root_cert)
    identity = Identity(device_id, paths.device_cert(device_id), paths.device_key(device_id))
    return openssl_s_time(settings, identity, seconds=seconds, processes=processes)


@dataclass
class ChurnComparison:
    broker: str
    ours: float
    ours_cpu_ms: float  # client CPU per connect
    openssl: float | None
    openssl_cpu_ms: float | None  # s_time's CPU per handshake


def churn_against_mosquitto(
    workspace: Workspace, device_ids: list[str], scratch: Path, *, seconds: float
) -> ChurnComparison | None:
    processes = os.cpu_count() or 1
    with mosquitto(workspace, scratch) as reference:
        if reference is None:
            return None
        ours_rate, ours_cpu = device_churn_rate(
            workspace, device_ids, reference.port, seconds=seconds, processes=processes
        )
        s_time = _s_time(
            workspace, device_ids[0], reference.port, seconds=seconds, processes=processes
        )
        return ChurnComparison(
            reference.name,
            ours_rate,
            ours_cpu * 1000,
            s_time.rate if s_time else None,
            s_time.cpu_per_handshake * 1000 if s_time else None,
        )


def ramp_against_mosquitto(
    workspace: Workspace, device_ids: list[str], scratch: Path
) -> tuple[str, float, int] | None:
    """The swarm's ramp (100 handshakes in flight per shard, no rate cap) against Mosquitto:
    (broker, connects per second, connected)."""
    with mosquitto(workspace, scratch) as reference:
        if reference is None:
            return None
        config = SwarmConfig(
            workspace=workspace.paths.root,
            device_ids=tuple(device_ids),
            port=reference.port,
            ramp_per_second=100_000.0,
            publish_every=600.0,
            duration=len(device_ids) / 150 + 10,  # time enough at half the target rate
            max_in_flight=100,
        )
        summary = run_swarm(config).summary()
        return reference.name, summary["ramp_rate"] or 0.0, summary["connected_at_deadline"]


@dataclass
class SwarmReport:
    held: HeldSwarmFigure
    churn: ChurnComparison | None
    mosquitto_ramp: tuple[str, float, int] | None


def run(
    base: Path,
    *,
    devices: int = 10_000,
    duration: float = 120.0,
    churn_seconds: float | None = None,
) -> SwarmReport:
    """The held swarm for ``duration``, then the churn against Mosquitto for ``churn_seconds``
    (default: a twelfth of ``duration``, 2 to 10 s: 10 s at the default two minutes)."""
    if churn_seconds is None:
        churn_seconds = min(10.0, max(2.0, duration / 12))
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    init_workspace(base / "ws", config=FleetConfig())
    workspace = Workspace.open(base / "ws")
    ids = provision_devices(workspace, ProvisionSpec(count=devices, prefix="sim")).device_ids
    probe = provision_devices(
        workspace, ProvisionSpec(count=1, prefix="probe", tier="silver")
    ).device_ids[0]
    held = held_swarm(workspace, ids, probe, duration=duration)
    churn = churn_against_mosquitto(workspace, ids[:2000], base, seconds=churn_seconds)
    ramp = ramp_against_mosquitto(workspace, ids, base)
    return SwarmReport(held=held, churn=churn, mosquitto_ramp=ramp)

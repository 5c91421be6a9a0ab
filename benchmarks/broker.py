"""Broker benchmarks: connect churn against ours and Mosquitto (same client, same run),
revocation latency, and what 10,000 held connections cost.

Both brokers run as separate processes on this machine; the load client runs in this one,
and the pub/sub latency probe in a third.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.mqtt_load import (
    DISCONNECT,
    PINGREQ,
    churn,
    device_context,
    open_session,
    percentile,
    publish_packet,
    publish_payload,
    read_packet,
    subscribe_packet,
)
from broker import broker_command, listening_port
from broker.cli import mosquitto_config
from device.handshake_bench import process_cpu_seconds
from fleet import (
    FleetConfig,
    ProvisionSpec,
    Workspace,
    init_workspace,
    provision_devices,
    revoke_device,
)

T = TypeVar("T")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_cpu_seconds = process_cpu_seconds


def _rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


@dataclass
class BrokerProcess:
    name: str
    process: subprocess.Popen[str]
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _wait_for_port(port: int, process: subprocess.Popen[str], name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port} within 30 s")


@contextlib.contextmanager
def ours(workspace: Workspace) -> Iterator[BrokerProcess]:
    command = broker_command(workspace.paths.root)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        broker = BrokerProcess(
            "mtls-fleet broker", process, listening_port(process.stdout.readline())
        )
    except BaseException:
        process.kill()
        raise
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def mosquitto(workspace: Workspace, scratch: Path) -> Iterator[BrokerProcess | None]:
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if binary is None:
        print("mosquitto is not installed (run 'make tools'): its reference figures are skipped")
        yield None
        return
    port = _free_port()
    conf = scratch / "mosquitto.conf"
    conf.write_text(mosquitto_config(workspace, port=port) + "max_connections -1\n")
    process = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
    )
    broker = BrokerProcess("mosquitto " + _mosquitto_version(binary), process, port)
    try:
        _wait_for_port(port, process, broker.name)
        yield broker
    finally:
        broker.stop()


def _mosquitto_version(binary: str) -> str:
    result = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    first = (
        (result.stdout or result.stderr).splitlines()[0] if (result.stdout or result.stderr) else ""
    )
    return first.split("version")[-1].strip() if "version" in first else "?"


def _contexts(workspace: Workspace, device_ids: list[str]) -> list[tuple[str, ssl.SSLContext]]:
    paths = workspace.paths
    return [
        (d, device_context(paths.root_cert, paths.device_cert(d), paths.device_key(d)))
        for d in device_ids
    ]


# -- churn ------------------------------------------------------------------------------------


@dataclass
class ChurnFigure:
    broker: str
    connects: int
    failures: int
    rate: float
    p50_ms: float
    p99_ms: float
    broker_cpu_ms: float


def measure_churn(
    broker: BrokerProcess, devices: list[tuple[str, ssl.SSLContext]], in_flight: int
) -> ChurnFigure:
    cpu_before = _cpu_seconds(broker.pid)
    result = _run(churn("127.0.0.1", broker.port, devices, in_flight=in_flight))
    cpu = _cpu_seconds(broker.pid) - cpu_before
    return ChurnFigure(
        broker=broker.name,
        connects=result.successes,
        failures=sum(result.failures.values()),
        rate=result.rate,
        p50_ms=percentile(result.latencies, 0.5) * 1000,
        p99_ms=percentile(result.latencies, 0.99) * 1000,
        broker_cpu_ms=cpu / max(1, result.successes) * 1000,
    )


# -- revocation latency -----------------------------------------------------------------------


async def _revocation_latencies(
    workspace: Workspace, port: int, devices: list[tuple[str, ssl.SSLContext]]
) -> list[float]:
    sessions = {d: await open_session("127.0.0.1", port, ctx, d) for d, ctx in devices}
    latencies = []
    for device_id, (reader, writer) in sessions.items():
        started = time.perf_counter()
        revoke_device(workspace, device_id)  # the registry belongs to this thread
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(reader.read(), 10)  # returns at EOF: the broker closed us
        latencies.append(time.perf_counter() - started)
        writer.close()
    return latencies


# -- held connections -------------------------------------------------------------------------


@dataclass
class HeldFigure:
    broker: str
    held: int
    ramp_rate: float
    rss_per_connection_kb: float
    round_trip_p99_ms: float
    max_stall_ms: float


async def _probe_round_trips(
    port: int,
    watcher: tuple[str, ssl.SSLContext],
    talker: tuple[str, ssl.SSLContext],
    stop: Callable[[], bool],
    ready: Callable[[], None],
) -> list[float]:
    """Publish a timestamp every 50 ms and time its arrival at a subscriber."""
    sub_reader, sub_writer = await open_session("127.0.0.1", port, watcher[1], watcher[0])
    sub_writer.write(subscribe_packet(f"devices/{talker[0]}/telemetry"))
    await read_packet(sub_reader)  # SUBACK
    _, pub_writer = await open_session("127.0.0.1", port, talker[1], talker[0])
    samples: list[float] = []

    async def receive() -> None:
        while True:
            first, body = await read_packet(sub_reader)
            if first >> 4 == 3:
                samples.append(time.perf_counter() - float(publish_payload(body)))

    receiver = asyncio.create_task(receive())
    ready()
    while not stop():
        pub_writer.write(
            publish_packet(f"devices/{talker[0]}/telemetry", repr(time.perf_counter()).encode())
        )
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    receiver.cancel()
    for writer in (sub_writer, pub_writer):
        writer.close()
    return samples


def _probe_process(
    port: int,
    workspace_root: str,
    watcher: str,
    talker: str,
    stop: EventType,
    ready: EventType,
    results: Connection,
) -> None:
    """The pub/sub probe in a process of its own: the load client's busy event loop must not
    count as broker latency (in one process, Mosquitto itself showed ~200-250 ms)."""
    workspace = Workspace.open(Path(workspace_root))
    (w, t) = _contexts(workspace, [watcher, talker])
    results.send(_run(_probe_round_trips(port, w, t, stop.is_set, ready.set)))


async def _max_ping_stall(
    port: int, device: tuple[str, ssl.SSLContext], stop: asyncio.Event
) -> float:
    reader, writer = await open_session("127.0.0.1", port, device[1], device[0])
    worst = 0.0
    while not stop.is_set():
        started = time.perf_counter()
        writer.write(PINGREQ)
        await read_packet(reader)
        worst = max(worst, time.perf_counter() - started)
        await asyncio.sleep(0.02)
    writer.close()
    return worst


async def _held(
    broker: BrokerProcess,
    workspace: Workspace,
    devices: list[tuple[str, ssl.SSLContext]],
    probes: list[tuple[str, ssl.SSLContext]],
    in_flight: int,
) -> HeldFigure:
    rss_before = _rss_bytes(broker.pid)
    spawn = multiprocessing.get_context("spawn")
    stop_probe, probe_ready = spawn.Event(), spawn.Event()
    samples, results = spawn.Pipe(duplex=False)
    probe = spawn.Process(
        target=_probe_process,
        args=(broker.port, str(workspace.paths.root), probes[0][0], probes[1][0],
              stop_probe, probe_ready, results),
    )  # fmt: skip
    probe.start()
    if not await asyncio.to_thread(probe_ready.wait, 60):
        probe.kill()
        raise RuntimeError(f"the pub/sub probe process did not start ({probe.exitcode})")
    sessions: list[asyncio.StreamWriter] = []
    queue = iter(devices)
    started = time.perf_counter()

    async def opener() -> None:
        for device_id, context in queue:
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
                sessions.append(
                    (await open_session("127.0.0.1", broker.port, context, device_id))[1]
                )

    await asyncio.gather(*(opener() for _ in range(in_flight)))
    ramp_seconds = time.perf_counter() - started
    stop_probe.set()
    if not await asyncio.to_thread(samples.poll, 60):
        probe.kill()
        raise RuntimeError(f"the pub/sub probe process ended without results ({probe.exitcode})")
    round_trips: list[float] = samples.recv()
    probe.join(10)
    await asyncio.sleep(1.0)
    rss_after = _rss_bytes(broker.pid)
    held = len(sessions)

    stop_ping = asyncio.Event()
    pinger = asyncio.create_task(_max_ping_stall(broker.port, probes[2], stop_ping))
    await asyncio.sleep(0.3)
    for writer in sessions:  # everyone leaves at once
        writer.write(DISCONNECT)
        writer.close()
    await asyncio.sleep(3.0)
    stop_ping.set()
    stall = await pinger
    return HeldFigure(
        broker=broker.name,
        held=held,
        ramp_rate=held / ramp_seconds,
        rss_per_connection_kb=(rss_after - rss_before) / max(1, held) / 1024,
        round_trip_p99_ms=percentile(round_trips, 0.99) * 1000,
        max_stall_ms=stall * 1000,
    )


def measure_held(
    broker: BrokerProcess,
    workspace: Workspace,
    devices: list[tuple[str, ssl.SSLContext]],
    probes: list[tuple[str, ssl.SSLContext]],
    in_flight: int,
) -> HeldFigure:
    return _run(_held(broker, workspace, devices, probes, in_flight))


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop, as ``fleet broker`` does, where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# -- the whole run ----------------------------------------------------------------------------


@dataclass
class BrokerReport:
    churn: list[ChurnFigure]
    revocation_ms: list[float]
    held: list[HeldFigure]


def run(
    base: Path,
    *,
    churn_connects: int = 2000,
    revocations: int = 50,
    held: int = 10_000,
    in_flight: int = 50,
) -> BrokerReport:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    init_workspace(base / "ws", config=FleetConfig())
    workspace = Workspace.open(base / "ws")
    churn_ids = provision_devices(
        workspace, ProvisionSpec(count=churn_connects, prefix="churn")
    ).device_ids
    held_ids = provision_devices(workspace, ProvisionSpec(count=held, prefix="held")).device_ids
    revoke_ids = provision_devices(
        workspace, ProvisionSpec(count=revocations, prefix="rev")
    ).device_ids
    probe_ids = provision_devices(
        workspace, ProvisionSpec(count=3, prefix="probe", tier="silver")
    ).device_ids
    churn_devices = _contexts(workspace, churn_ids)
    probes = _contexts(workspace, probe_ids)

    figures = []
    with ours(workspace) as broker:
        figures.append(measure_churn(broker, churn_devices, in_flight))
    with mosquitto(workspace, base) as reference:
        if reference is not None:
            figures.append(measure_churn(reference, churn_devices, in_flight))

    with ours(workspace) as broker:
        latencies = _run(
            _revocation_latencies(workspace, broker.port, _contexts(workspace, revoke_ids))
        )

    held_devices = _contexts(workspace, held_ids)
    held_figures = []
    with ours(workspace) as broker:
        held_figures.append(measure_held(broker, workspace, held_devices, probes, in_flight=100))
    with mosquitto(workspace, base) as reference:
        if reference is not None:
            held_figures.append(
                measure_held(reference, workspace, held_devices, probes, in_flight=100)
            )
    return BrokerReport(
        churn=figures, revocation_ms=[x * 1000 for x in latencies], held=held_figures
    )

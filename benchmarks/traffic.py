"""Message traffic through a broker: fan-in (many publishers, one subscriber) and fan-out
(one publisher, many subscribers), ours beside Mosquitto with the same client in the same run.

The load client is spread over processes (spawned, each on its own event loop) so that it is
not what limits the figure; its CPU is reported beside the broker's. Every message carries the
monotonic time it was sent (one clock for all processes on Linux) and the step it belongs to,
so each subscriber process times and counts deliveries per step by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

from benchmarks.broker import BrokerProcess, _cpu_seconds, _run, mosquitto, ours
from benchmarks.mqtt_load import (
    connect_packet,
    device_context,
    percentile,
    remaining_length,
    subscribe_packet,
)
from fleet import FleetConfig, ProvisionSpec, Workspace, init_workspace, provision_devices

_STAMP = struct.Struct("!dI")  # send time (time.monotonic), step index
_PAYLOAD_BYTES = 64
_TICK = 0.005  # publishers write a tick's quota of packets at once
_WINDOW = 20  # unacknowledged QoS 1 PUBLISHes per publishing device (Mosquitto's inflight)
_GAP_SECONDS = 1.0  # between steps: what is late still arrives, counted for its own step
P99_LIMIT_MS = 50.0


@dataclass(frozen=True)
class Step:
    rate: float | None  # offered messages/s over all publishers; None: as fast as acknowledged
    seconds: float


@dataclass
class StepFigure:
    offered: float | None  # messages/s published
    sent: int = 0  # deliveries expected (sent times subscribers)
    delivered: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    seconds: float = 0.0
    broker_cpu_us: float = float("nan")  # broker CPU per delivered message
    client_cpu_s: float = 0.0
    subscribers: int = 1

    @property
    def offered_deliveries(self) -> float:
        """Deliveries per second offered (the publish rate times the subscribers)."""
        return (self.offered or 0.0) * self.subscribers

    @property
    def delivered_rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def in_full(self) -> bool:
        return self.sent > 0 and self.delivered >= self.sent


@dataclass
class TrafficFigure:
    broker: str
    kind: str
    steps: list[StepFigure] = field(default_factory=list)

    def best_in_full(self) -> StepFigure | None:
        """The highest offered rate delivered in full with a p99 within 50 ms."""
        good = [s for s in self.steps if s.offered and s.in_full and s.p99_ms <= P99_LIMIT_MS]
        return max(good, key=lambda s: s.offered or 0.0, default=None)


# -- the client: one asyncio protocol per connection -------------------------------------------


class _Client(asyncio.Protocol):
    """CONNECT, then: count PUBACKs (publisher) or time PUBLISHes and PUBACK them (subscriber)."""

    def __init__(self, steps: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.connected = asyncio.get_running_loop().create_future()
        self.subscribed = asyncio.get_running_loop().create_future()
        self.unacked = 0
        self.received = [0] * steps
        self.latencies: list[list[float]] = [[] for _ in range(steps)]
        self.window_open = asyncio.Event()
        self.window_open.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset, end, acks = 0, len(buffer), []
        while end - offset >= 2:
            first = buffer[offset]
            length, shift, index = 0, 0, offset + 1
            while index < end:
                byte = buffer[index]
                length |= (byte & 0x7F) << shift
                shift += 7
                index += 1
                if not byte & 0x80:
                    break
            else:
                break
            if index + length > end:
                break
            body = bytes(buffer[index : index + length])
            offset = index + length
            kind = first >> 4
            if kind == 3:
                topic_end = 2 + int.from_bytes(body[:2], "big")
                qos = (first >> 1) & 3
                start = topic_end + (2 if qos else 0)
                if qos:
                    acks.append(b"\x40\x02" + body[topic_end : topic_end + 2])
                sent_at, step = _STAMP.unpack_from(body, start)
                if step < len(self.received):
                    self.received[step] += 1
                    self.latencies[step].append(time.monotonic() - sent_at)
            elif kind == 4:
                self.unacked -= 1
                if self.unacked < _WINDOW:
                    self.window_open.set()
            elif kind == 2 and not self.connected.done():
                self.connected.set_result(body[1] == 0)
            elif kind == 9 and not self.subscribed.done():
                self.subscribed.set_result(body[2] < 0x80)
        del buffer[:offset]
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in (self.connected, self.subscribed):
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"connection lost: {exc}"))


async def _open(port: int, context: ssl.SSLContext, client_id: str, steps: int) -> _Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: _Client(steps), "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    assert client.transport is not None
    client.transport.write(connect_packet(client_id, keepalive=600))
    if not await asyncio.wait_for(client.connected, 30):
        raise ConnectionRefusedError(f"{client_id}: CONNACK refused")
    return client


def _publish(topic: bytes, packet_id: int, step: int) -> bytes:
    payload = _STAMP.pack(time.monotonic(), step).ljust(_PAYLOAD_BYTES, b".")
    body = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big") + payload
    return b"\x32" + remaining_length(len(body)) + body


def _contexts(root: str, device_ids: list[str]) -> list[tuple[str, ssl.SSLContext]]:
    paths = Workspace.open(Path(root)).paths
    return [
        (d, device_context(paths.root_cert, paths.device_cert(d), paths.device_key(d)))
        for d in device_ids
    ]


# -- the processes -----------------------------------------------------------------------------


async def _publishers(
    port: int,
    devices: list[tuple[str, ssl.SSLContext]],
    topics: list[bytes],
    steps: list[Step],
    share: float,
    ready: EventType,
    go: EventType,
) -> list[int]:
    clients = [await _open(port, context, d, len(steps)) for d, context in devices]
    ready.set()
    await asyncio.to_thread(go.wait)
    sent = [0] * len(steps)
    packet_ids = [0] * len(clients)

    def write(index: int, count: int, step: int) -> int:
        client = clients[index]
        count = min(count, _WINDOW - client.unacked)
        if count <= 0:
            client.window_open.clear()
            return 0
        packets = []
        for _ in range(count):
            packet_ids[index] = packet_ids[index] % 65535 + 1
            packets.append(_publish(topics[index], packet_ids[index], step))
        client.unacked += count
        assert client.transport is not None
        client.transport.write(b"".join(packets))
        return count

    for step_index, step in enumerate(steps):
        started = time.monotonic()
        deadline = started + step.seconds
        if step.rate is None:

            async def flood(
                index: int, step_index: int = step_index, end: float = deadline
            ) -> None:
                while time.monotonic() < end:
                    sent[step_index] += write(index, _WINDOW, step_index)
                    await clients[index].window_open.wait()

            await asyncio.gather(*(flood(i) for i in range(len(clients))))
        else:
            per_device = step.rate * share / len(clients)
            owed = [0.0] * len(clients)
            while (now := time.monotonic()) < deadline:
                for index in range(len(clients)):
                    owed[index] += per_device * _TICK
                    whole = int(owed[index])
                    if whole:
                        owed[index] -= whole
                        sent[step_index] += write(index, whole, step_index)
                await asyncio.sleep(max(0.0, _TICK - (time.monotonic() - now)))
        await asyncio.sleep(_GAP_SECONDS)
    return sent


def _publisher_process(
    port: int,
    root: str,
    device_ids: list[str],
    topics: list[str],
    steps: list[Step],
    share: float,
    ready: EventType,
    go: EventType,
    results: Connection,
) -> None:
    devices = _contexts(root, device_ids)
    encoded = [t.encode() for t in topics]
    sent = _run(_publishers(port, devices, encoded, steps, share, ready, go))
    results.send((sent, time.process_time()))


async def _subscribers(
    port: int,
    devices: list[tuple[str, ssl.SSLContext]],
    topic_filter: str,
    steps: int,
    ready: EventType,
    done: EventType,
) -> tuple[list[int], list[list[float]]]:
    clients = []
    for device_id, context in devices:
        client = await _open(port, context, device_id, steps)
        assert client.transport is not None
        client.transport.write(subscribe_packet(topic_filter, qos=1))
        if not await asyncio.wait_for(client.subscribed, 30):
            raise PermissionError(f"{device_id}: SUBSCRIBE {topic_filter} refused")
        clients.append(client)
    ready.set()
    await asyncio.to_thread(done.wait)
    received = [sum(c.received[s] for c in clients) for s in range(steps)]
    latencies = [[x for c in clients for x in c.latencies[s]] for s in range(steps)]
    return received, latencies


def _subscriber_process(
    port: int,
    root: str,
    device_ids: list[str],
    topic_filter: str,
    steps: int,
    ready: EventType,
    done: EventType,
    results: Connection,
) -> None:
    devices = _contexts(root, device_ids)
    received, latencies = _run(_subscribers(port, devices, topic_filter, steps, ready, done))
    summary = [
        (received[s], percentile(latencies[s], 0.5), percentile(latencies[s], 0.99))
        for s in range(steps)
    ]
    results.send((summary, time.process_time()))


def _groups(items: list[str], count: int) -> list[list[str]]:
    count = max(1, min(count, len(items)))
    return [items[index::count] for index in range(count)]


@contextlib.contextmanager
def _processes(specs: list[tuple[Any, tuple[Any, ...]]]) -> Iterator[list[Connection]]:
    spawn = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for target, args in specs:
        receiver, sender = spawn.Pipe(duplex=False)
        process = spawn.Process(target=target, args=(*args, sender), daemon=True)
        process.start()
        pipes.append(receiver)
        processes.append(process)
    try:
        yield pipes
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()


def _receive(pipe: Connection, what: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"the {what} process sent no result within {timeout:.0f} s")
    return pipe.recv()


def measure(
    broker: BrokerProcess,
    root: str,
    *,
    kind: str,
    publishers: list[str],
    publish_topics: list[str],
    subscribers: list[str],
    topic_filter: str,
    steps: list[Step],
    publisher_processes: int,
    subscriber_processes: int,
) -> TrafficFigure:
    """Run ``steps`` one after the other against ``broker``; one figure per step."""
    spawn = multiprocessing.get_context("spawn")
    topic_of = dict(zip(publishers, publish_topics, strict=True))
    sub_groups = _groups(subscribers, subscriber_processes)
    pub_groups = _groups(publishers, publisher_processes)
    sub_ready = [spawn.Event() for _ in sub_groups]
    pub_ready = [spawn.Event() for _ in pub_groups]
    go, done = spawn.Event(), spawn.Event()
    specs: list[tuple[Any, tuple[Any, ...]]] = [
        (_subscriber_process, (broker.port, root, g, topic_filter, len(steps), r, done))
        for g, r in zip(sub_groups, sub_ready, strict=True)
    ]
    specs += [
        (
            _publisher_process,
            (broker.port, root, g, [topic_of[d] for d in g], steps, len(g) / len(publishers),
             r, go),
        )
        for g, r in zip(pub_groups, pub_ready, strict=True)
    ]  # fmt: skip
    total_seconds = sum(s.seconds + _GAP_SECONDS for s in steps)
    with _processes(specs) as pipes:
        for event in sub_ready + pub_ready:
            if not event.wait(120):
                raise RuntimeError(f"{kind}: a client process did not connect within 120 s")
        cpu_before = _cpu_seconds(broker.pid)
        go.set()
        publisher_results = [
            _receive(p, "publisher", total_seconds + 60) for p in pipes[len(sub_groups) :]
        ]
        cpu = _cpu_seconds(broker.pid) - cpu_before
        done.set()
        subscriber_results = [_receive(p, "subscriber", 60) for p in pipes[: len(sub_groups)]]
    figure = TrafficFigure(broker=broker.name, kind=kind)
    total_delivered = 0
    for index, step in enumerate(steps):
        sent = sum(result[0][index] for result in publisher_results)
        delivered = sum(result[0][index][0] for result in subscriber_results)
        total_delivered += delivered
        # percentiles of the busiest subscriber process (they see the same messages)
        p50 = max(result[0][index][1] for result in subscriber_results)
        p99 = max(result[0][index][2] for result in subscriber_results)
        expected = sent * (len(subscribers) if kind == "fan-out" else 1)
        figure.steps.append(
            StepFigure(
                offered=step.rate,
                sent=expected,
                delivered=delivered,
                p50_ms=p50 * 1000,
                p99_ms=p99 * 1000,
                seconds=step.seconds,
                subscribers=len(subscribers),
            )
        )
    client_cpu = sum(r[1] for r in publisher_results) + sum(r[1] for r in subscriber_results)
    for step_figure in figure.steps:
        step_figure.broker_cpu_us = cpu / max(1, total_delivered) * 1e6
        step_figure.client_cpu_s = client_cpu
    return figure


# -- the whole run -----------------------------------------------------------------------------

FAN_IN_STEPS = [Step(rate, 3.0) for rate in (1_000, 2_000, 4_000, 8_000, 16_000, 32_000)]
# one publisher: each message is delivered to every subscriber
FAN_OUT_STEPS = [Step(rate, 3.0) for rate in (5, 10, 20, 40, 80)]


@dataclass
class TrafficReport:
    fan_in: list[TrafficFigure]  # paced steps
    fan_in_flood: list[TrafficFigure]
    fan_out: list[TrafficFigure]  # paced steps
    fan_out_flood: list[TrafficFigure]


def run(
    base: Path,
    *,
    publishers: int = 20,
    fan_out_subscribers: int = 1000,
    flood_seconds: float = 5.0,
    brokers: tuple[str, ...] = ("ours", "mosquitto"),
) -> TrafficReport:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    root = base / "ws"
    init_workspace(root, config=FleetConfig())
    workspace = Workspace.open(root)
    pub_ids = provision_devices(workspace, ProvisionSpec(count=publishers, prefix="pub")).device_ids
    sub_id = provision_devices(
        workspace, ProvisionSpec(count=1, prefix="sub", tier="silver")
    ).device_ids
    gold = provision_devices(
        workspace, ProvisionSpec(count=1, prefix="caster", tier="gold")
    ).device_ids
    listeners = provision_devices(
        workspace, ProvisionSpec(count=fan_out_subscribers, prefix="listener")
    ).device_ids
    clients = max(2, (os.cpu_count() or 2))
    fan_in: dict[str, Any] = {
        "publishers": pub_ids,
        "publish_topics": [f"devices/{d}/telemetry" for d in pub_ids],
        "subscribers": sub_id,
        "topic_filter": "devices/+/telemetry",
        "publisher_processes": clients,
        "subscriber_processes": 1,
    }
    fan_out: dict[str, Any] = {
        "publishers": gold,
        "publish_topics": ["fleet/broadcast/bench"],
        "subscribers": listeners,
        "topic_filter": "fleet/broadcast/#",
        "publisher_processes": 1,
        "subscriber_processes": clients,
    }
    flood = [Step(None, flood_seconds)]
    report = TrafficReport(fan_in=[], fan_in_flood=[], fan_out=[], fan_out_flood=[])
    for name in brokers:
        starter = ours(workspace) if name == "ours" else mosquitto(workspace, base)
        with starter as broker:
            if broker is None:
                continue
            at = str(root)
            report.fan_in.append(measure(broker, at, kind="fan-in", steps=FAN_IN_STEPS, **fan_in))
            report.fan_in_flood.append(measure(broker, at, kind="fan-in", steps=flood, **fan_in))
            report.fan_out.append(
                measure(broker, at, kind="fan-out", steps=FAN_OUT_STEPS, **fan_out)
            )
            report.fan_out_flood.append(measure(broker, at, kind="fan-out", steps=flood, **fan_out))
    return report

"""A QoS 0 flood from many devices at once: what it costs the broker, and a bystander's service.

Each flooder connects with its own certificate and writes PUBLISH packets to its own telemetry
topic as fast as the broker reads them; one of them also subscribes to its own topic and never
reads (a stalled subscriber). Meanwhile a well-behaved device publishes QoS 1 messages at a
steady pace to its own topic and subscribes to it. Measured: the broker's resident memory
before, at its peak and after, and how many of the paced messages were acknowledged and
delivered back. The same run against Mosquitto (with the same per-client limits) is the
reference.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.broker import BrokerProcess, _rss_bytes, mosquitto, ours
from benchmarks.mqtt_load import (
    connect_packet,
    device_context,
    publish_packet,
    subscribe_packet,
)
from fleet import FleetConfig, ProvisionSpec, Workspace, init_workspace, provision_devices

PAYLOAD = b"x" * 1024
BATCH = 64  # PUBLISH packets per write


@dataclass
class FloodFigure:
    broker: str
    flooders: int
    seconds: float
    sent_bytes: int = 0
    refused_flooders: int = 0
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    paced_sent: int = 0
    paced_acked: int = 0
    paced_delivered: int = 0

    @property
    def growth_mb(self) -> float:
        return (self.rss_peak - self.rss_before) / 2**20


class _Flooder(threading.Thread):
    def __init__(self, port: int, context: ssl.SSLContext, device_id: str, stall: bool) -> None:
        super().__init__(daemon=True, name=f"flood-{device_id}")
        self.port, self.context, self.device_id, self.stall = port, context, device_id, stall
        self.sock: ssl.SSLSocket | None = None
        self.sent = 0
        self.connected = threading.Event()
        self.failed: str | None = None

    def run(self) -> None:
        topic = f"devices/{self.device_id}/telemetry"
        chunk = publish_packet(topic, PAYLOAD) * BATCH
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            tls = self.sock = self.context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(connect_packet(self.device_id))
            if tls.recv(4)[3:4] != b"\x00":
                raise ConnectionError("CONNACK refused")
            if self.stall:
                tls.sendall(subscribe_packet(topic))
            tls.settimeout(None)
            self.connected.set()
            while True:
                tls.sendall(chunk)
                self.sent += len(chunk)
        except OSError as exc:
            self.failed = str(exc)
        finally:
            self.connected.set()

    def stop(self) -> None:
        if self.sock is not None:  # wakes the thread blocked in sendall with an error
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class _PacedDevice:
    """paho, QoS 1, subscribed to its own topic; publishes one message every ``interval``."""

    def __init__(self, port: int, workspace: Workspace, device_id: str) -> None:
        paths = workspace.paths
        self.topic = f"devices/{device_id}/telemetry"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, reconnect_on_failure=False
        )
        self.client.tls_set_context(
            device_context(
                paths.root_cert, paths.device_cert(device_id), paths.device_key(device_id)
            )
        )
        self.ready = threading.Event()
        self.received: set[bytes] = set()
        self.acked = 0
        self._lock = threading.Lock()
        self.client.on_subscribe = lambda *args: self.ready.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.add(bytes(message.payload))

    def _on_publish(self, *args: object) -> None:
        with self._lock:
            self.acked += 1

    def publish(self, index: int) -> None:
        self.client.publish(self.topic, f"paced-{index}".encode(), qos=1)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure_flood(
    broker: BrokerProcess,
    workspace: Workspace,
    flooder_ids: list[str],
    paced_id: str,
    *,
    seconds: float = 10.0,
    paced_messages: int = 30,
    settle: float = 5.0,
) -> FloodFigure:
    """Flood ``broker`` for ``seconds``; the paced device sends ``paced_messages`` meanwhile."""
    paths = workspace.paths
    figure = FloodFigure(broker.name, len(flooder_ids), seconds)
    paced = _PacedDevice(broker.port, workspace, paced_id)
    if not paced.ready.wait(15):
        raise RuntimeError(f"the paced device could not subscribe on {broker.name}")
    figure.rss_before = _rss_bytes(broker.pid)
    flooders = [
        _Flooder(
            broker.port,
            device_context(paths.root_cert, paths.device_cert(d), paths.device_key(d)),
            d,
            stall=index == 0,
        )
        for index, d in enumerate(flooder_ids)
    ]
    peak = figure.rss_before
    for flooder in flooders:
        flooder.start()
    for flooder in flooders:
        flooder.connected.wait(15)
    started = time.monotonic()
    interval = seconds / paced_messages
    for index in range(paced_messages):
        paced.publish(index)
        while time.monotonic() < started + (index + 1) * interval:
            peak = max(peak, _rss_bytes(broker.pid))
            time.sleep(0.05)
    for flooder in flooders:
        flooder.stop()
    for flooder in flooders:
        flooder.join(10)
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and len(paced.received) < paced_messages:
        peak = max(peak, _rss_bytes(broker.pid))
        time.sleep(0.05)
    paced.stop()
    figure.rss_peak = peak
    figure.rss_after = _rss_bytes(broker.pid)
    figure.sent_bytes = sum(f.sent for f in flooders)
    figure.refused_flooders = sum(1 for f in flooders if f.sent == 0)
    figure.paced_sent = paced_messages
    figure.paced_acked = paced.acked
    figure.paced_delivered = len(paced.received)
    return figure


def run(base: Path, *, flooders: int = 20, seconds: float = 10.0) -> list[FloodFigure]:
    """The flood against our broker, then against Mosquitto (when installed)."""
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    init_workspace(base / "ws", config=FleetConfig())
    workspace = Workspace.open(base / "ws")
    flood_ids = provision_devices(
        workspace, ProvisionSpec(count=flooders, prefix="flood")
    ).device_ids
    paced_id = provision_devices(workspace, ProvisionSpec(count=1, prefix="paced")).device_ids[0]
    figures = []
    with ours(workspace) as broker:
        figures.append(measure_flood(broker, workspace, flood_ids, paced_id, seconds=seconds))
    with mosquitto(workspace, base) as reference:
        if reference is not None:
            figures.append(
                measure_flood(reference, workspace, flood_ids, paced_id, seconds=seconds)
            )
    return figures

"""Test helpers for the broker: a broker on its own event-loop thread, real MQTT clients."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from paho.mqtt.enums import CallbackAPIVersion

from broker import BrokerSettings, FleetBroker
from fleet import DeviceIdentity, KeyType, Workspace, generate_private_key
from fleet.kernel.keys import private_key_pem
from tests.conftest import fleet_command, require_tool

T = TypeVar("T")


class BrokerThread:
    """A FleetBroker on port 0 served by an event loop in a background thread.

    Tests stay synchronous (subprocess tools, paho) while the broker runs for real.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="broker", daemon=True)
        self._thread.start()
        self.broker: FleetBroker = self.call(self._start(settings))
        assert self.broker.port is not None
        self.port: int = self.broker.port

    async def _start(self, settings: BrokerSettings) -> FleetBroker:
        broker = FleetBroker(settings)
        await broker.start()
        return broker

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def wait_for_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        return self.call(self.broker.wait_for_event(predicate, timeout), timeout + 5)

    def outcome_count(self, outcome: str) -> float:
        value = self.broker.metrics.registry.get_sample_value(
            "mtls_connection_attempts_total", {"outcome": outcome}
        )
        return value or 0.0

    def stop(self) -> None:
        self.call(self.broker.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def settings_for_tests(workspace: Workspace, **overrides: object) -> BrokerSettings:
    """Settings for a broker under test: any free port, no metrics server, prod, a 2 s
    handshake timeout, no event log on stderr; ``overrides`` change any of them."""
    options: dict[str, object] = {
        "workspace": workspace.paths.root,
        "port": 0,
        "metrics_port": None,
        "env": "prod",
        "handshake_timeout": 2.0,
        "event_log": False,
    }
    options.update(overrides)
    return BrokerSettings(**options)  # type: ignore[arg-type]


@dataclass
class Credentials:
    """A certificate chain and key on disk, as a device (or an impostor) holds them."""

    device_id: str
    cert: Path
    key: Path


def device_credentials(workspace: Workspace, device_id: str) -> Credentials:
    return Credentials(
        device_id, workspace.paths.device_cert(device_id), workspace.paths.device_key(device_id)
    )


def issue_with_eku(
    workspace: Workspace, directory: Path, device_id: str, eku: list[Any]
) -> Credentials:
    """A certificate from the fleet CA with a deliberately chosen EKU (e.g. serverAuth only)."""
    key = generate_private_key(KeyType.EC_P256)
    now = dt.datetime.now(dt.UTC)
    template = workspace.ca.device_template(
        key_type=KeyType.EC_P256,
        not_before=now,
        not_after=now + dt.timedelta(days=1),
        extended_key_usage=eku,
    )
    identity = DeviceIdentity(
        device_id=device_id, tier="bronze", env="prod", trust_domain=workspace.config.trust_domain
    )
    cert = template.issue(identity, key.public_key())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(cert.public_bytes(Encoding.PEM) + workspace.ca.issuing_pem)
    (directory / "key.pem").write_bytes(private_key_pem(key))
    return Credentials(device_id, directory / "cert.pem", directory / "key.pem")


SERVER_AUTH_ONLY = [ExtendedKeyUsageOID.SERVER_AUTH]


def mosquitto_pub(
    port: int,
    ca: Path,
    creds: Credentials | None,
    topic: str,
    message: str,
    *,
    client_id: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Publish once at QoS 1 with Mosquitto's own client; returns the finished process."""
    binary = require_tool("mosquitto_pub")
    args = [
        binary,
        "-h",
        "localhost",
        "-p",
        str(port),
        "--cafile",
        str(ca),
        "-t",
        topic,
        "-m",
        message,
        "-q",
        "1",
    ]
    if creds is not None:
        args += ["--cert", str(creds.cert), "--key", str(creds.key)]
    args += ["-i", client_id or (creds.device_id if creds else "anonymous")]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


@dataclass
class PahoDevice:
    """A paho-mqtt client holding one device's certificate, with events for tests to wait on."""

    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    message_arrived: threading.Event = field(default_factory=threading.Event)
    granted: list[int] = field(default_factory=list)
    reason: str | None = None

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def tls_context(ca: Path, creds: Credentials) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.load_cert_chain(str(creds.cert), str(creds.key))
    return context


def paho_device(
    port: int, ca: Path, creds: Credentials, *, client_id: str | None = None
) -> PahoDevice:
    """Connect (no automatic reconnect) and start paho's network thread."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or creds.device_id,
        reconnect_on_failure=False,
    )
    client.tls_set_context(tls_context(ca, creds))
    device = PahoDevice(client)

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        device.reason = str(reason)
        if not reason.is_failure:
            device.connected.set()

    def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        device.reason = str(reason)
        device.disconnected.set()

    def on_subscribe(c: Any, userdata: Any, mid: Any, reasons: Any, properties: Any) -> None:
        device.granted.extend(r.value for r in reasons)
        device.subscribed.set()

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        device.messages.append((message.topic, message.payload))
        device.message_arrived.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("localhost", port)
    client.loop_start()
    return device


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_mosquitto(workspace_dir: Path, conf: Path, *emit_options: str | Path) -> Iterator[int]:
    """A real Mosquitto started from the config ``fleet broker --emit-mosquitto-conf`` writes
    (with ``emit_options``, e.g. ``--policy FILE``).

    Yields its port once Mosquitto says it listens; skips when Mosquitto is not installed.
    """
    mosquitto = require_tool("mosquitto")
    port = free_port()
    emitted = subprocess.run(
        fleet_command("broker", "--dir", workspace_dir, "--port", str(port), "--emit-mosquitto-conf", conf, *emit_options),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert emitted.returncode == 0, emitted.stderr
    server = subprocess.Popen(
        [mosquitto, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert server.stdout is not None
        # "Opening ipv4 listen socket" comes before the socket listens; "running" after.
        for line in server.stdout:
            if " running" in line:
                break
        yield port
    finally:
        server.terminate()
        server.wait(10)

"""The broker's identity gate against hostile clients, and the bystanders it must protect.

Every attack is made on real TLS sockets with a raw client (tests.mqtt_raw) that sends exactly
the bytes an attacker would, or with Mosquitto's own clients; each test then checks that the
victim's session still works: its subscription receives, its queued messages stay its own.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.mqtt_load import remaining_length
from fleet import ProvisionSpec, Workspace, provision_devices, revoke_device
from fleet.store.workspace import ADMIN_NAME
from tests import mqtt_raw as mq
from tests.broker_support import (
    SERVER_AUTH_ONLY,
    BrokerThread,
    Credentials,
    device_credentials,
    issue_with_eku,
    settings_for_tests,
)
from tests.conftest import require_tool
from tests.mqtt_raw import RawClient

ACCEPTED = (0, 0)
NOT_AUTHORIZED = (0, 5)
RESUMED = (1, 0)


@pytest.fixture(scope="module")
def hostile_fleet(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    from fleet import FleetConfig, init_workspace

    root = tmp_path_factory.mktemp("hostile") / "fleet"
    init_workspace(root, config=FleetConfig())
    workspace = Workspace.open(root)
    provision_devices(workspace, ProvisionSpec(count=4, prefix="dev"))
    provision_devices(workspace, ProvisionSpec(count=1, prefix="watcher", tier="silver"))
    provision_devices(workspace, ProvisionSpec(count=2, prefix="gw", tier="gold"))
    provision_devices(workspace, ProvisionSpec(count=1, prefix="vip", tier="gold"))
    return workspace


@pytest.fixture
def broker(hostile_fleet: Workspace) -> Iterator[BrokerThread]:
    running = BrokerThread(settings_for_tests(hostile_fleet, log_connections=True))
    yield running
    running.stop()


class Clients:
    """Raw clients of one broker, closed at the end of the test."""

    def __init__(self, workspace: Workspace, broker: BrokerThread) -> None:
        self.workspace = workspace
        self.broker = broker
        self._open: list[RawClient] = []

    def creds(self, device_id: str) -> Credentials:
        return device_credentials(self.workspace, device_id)

    def raw(self, device_id: str | Credentials) -> RawClient:
        creds = self.creds(device_id) if isinstance(device_id, str) else device_id
        client = RawClient(self.broker.port, self.workspace.paths.root_cert, creds)
        self._open.append(client)
        return client

    def connected(self, device_id: str, client_id: str | None = None, **options: Any) -> RawClient:
        client = self.raw(device_id)
        client.send(mq.connect(client_id or device_id, **options))
        assert client.connack() in (ACCEPTED, RESUMED)
        return client

    def subscribed(self, device_id: str, *filters: str, **options: Any) -> RawClient:
        client = self.connected(device_id, **options)
        client.send(mq.subscribe(1, *((f, 1) for f in filters)))
        suback = client.read()
        assert suback is not None and suback.kind == 9
        assert list(suback.body[2:]) == [1] * len(filters), "every filter granted"
        return client

    def close(self) -> None:
        for client in self._open:
            client.close()


@pytest.fixture
def clients(hostile_fleet: Workspace, broker: BrokerThread) -> Iterator[Clients]:
    made = Clients(hostile_fleet, broker)
    yield made
    made.close()


def _gold_sends_command(clients: Clients, target: str, payload: bytes) -> None:
    """gw-00002 (gold) publishes a QoS 1 command to ``target`` and waits for its PUBACK."""
    _gold_publishes(clients, f"devices/{target}/commands", payload)


def _gold_publishes(clients: Clients, topic: str, payload: bytes) -> None:
    gold = clients.connected("gw-00002", client_id="gw-00002")
    gold.send(mq.publish(topic, payload, qos=1, packet_id=7))
    ack = gold.read()
    assert ack is not None and ack.kind == 4
    gold.send(mq.DISCONNECT)


def _next_publish(client: RawClient, timeout: float = 5) -> mq.Received:
    while True:
        received = client.read(timeout)
        assert received is not None, "nothing arrived"
        if received.kind == 3:
            if (received.flags >> 1) & 3:
                client.send(mq.puback(received.packet_id))
            return received


def _rejection(broker: BrokerThread, reason: str, device: str) -> dict[str, Any]:
    return broker.wait_for_event(
        lambda e: (
            e.get("event") == "rejected" and e.get("reason") == reason and e.get("device") == device
        )
    )


# -- session ownership ---------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["dev-00001", "gw-00001"], ids=["bronze", "gold"])
@pytest.mark.parametrize("attacker_clean", [False, True], ids=["clean0", "clean1"])
def test_another_certificate_cannot_resume_or_wipe_a_stored_session(
    clients: Clients, broker: BrokerThread, victim: str, attacker_clean: bool
) -> None:
    stored = clients.subscribed(victim, f"devices/{victim}/commands", clean=False)
    stored.send(mq.DISCONNECT)
    assert stored.closed_within(2)
    _gold_sends_command(clients, victim, b"for the victim only")

    attacker = clients.raw("dev-00002")
    attacker.send(mq.connect(victim, clean=attacker_clean))
    assert attacker.connack() == NOT_AUTHORIZED
    assert attacker.closed_within(2)
    event = _rejection(broker, "identity_mismatch", "dev-00002")
    assert victim in event["detail"]

    # the victim resumes its own session and gets its own queued message
    back = clients.connected(victim, clean=False)
    message = _next_publish(back)
    assert (message.topic, message.payload) == (
        f"devices/{victim}/commands",
        b"for the victim only",
    )
    assert broker.outcome_count("ok") == 3  # the victim twice, the gold device, nobody else


def test_a_revoked_gold_device_stored_session_gives_nobody_its_rights(
    clients: Clients, broker: BrokerThread, hostile_fleet: Workspace
) -> None:
    stored = clients.subscribed("vip-00001", "devices/vip-00001/commands", clean=False)
    revoke_device(hostile_fleet, "vip-00001")
    assert stored.closed_within(5), "the revoked device's live session is cut"
    with pytest.raises((EOFError, OSError)):
        again = clients.raw("vip-00001")
        again.send(mq.connect("vip-00001", clean=False))
        again.connack()
    attacker = clients.raw("dev-00002")  # bronze, resuming the gold device's session
    attacker.send(mq.connect("vip-00001", clean=False))
    assert attacker.connack() == NOT_AUTHORIZED
    assert attacker.closed_within(2)
    # with its own session the attacker still has only bronze rights
    own = clients.connected("dev-00002")
    own.send(mq.subscribe(5, ("devices/+/commands", 1)))
    refused = own.read()
    assert refused is not None and list(refused.body[2:]) == [0x80]
    observer = clients.subscribed("dev-00003", "fleet/broadcast/#")
    own.send(mq.publish("fleet/broadcast/ota", b"forged", qos=1, packet_id=9))
    assert own.read() is not None  # PUBACK (MQTT 3.1.1 acknowledges a refused publish)
    broker.wait_for_event(
        lambda e: e.get("event") == "acl_denied" and e.get("device") == "dev-00002"
    )
    _gold_publishes(clients, "fleet/broadcast/ota", b"genuine")
    assert _next_publish(observer).payload == b"genuine", "the genuine one, not the forged one"


@pytest.mark.parametrize("victim_clean", [False, True], ids=["victim-clean0", "victim-clean1"])
@pytest.mark.parametrize("attacker_clean", [False, True], ids=["clean0", "clean1"])
def test_a_refused_connect_leaves_the_live_victim_receiving(
    clients: Clients, broker: BrokerThread, victim_clean: bool, attacker_clean: bool
) -> None:
    victim = clients.subscribed("dev-00001", "devices/dev-00001/commands", clean=victim_clean)
    attacker = clients.raw("dev-00002")
    attacker.send(mq.connect("dev-00001", clean=attacker_clean))
    assert attacker.connack() == NOT_AUTHORIZED
    _gold_sends_command(clients, "dev-00001", b"still yours")
    message = _next_publish(victim)
    assert message.payload == b"still yours"
    assert not victim.closed_within(0.2)
    assert broker.broker.session_peers()["dev-00001"] == _local_address(victim)


def test_the_control_plane_cannot_be_impersonated_or_silenced(
    clients: Clients, broker: BrokerThread, hostile_fleet: Workspace
) -> None:
    paths = hostile_fleet.paths
    admin_creds = Credentials(ADMIN_NAME, paths.admin_cert, paths.admin_key)
    admin_id = f"admin:{ADMIN_NAME}"
    admin = clients.raw(admin_creds)
    admin.send(mq.connect(admin_id, clean=False))
    assert admin.connack() == ACCEPTED
    admin.send(mq.subscribe(1, ("$fleet/renew/+/request", 1)))
    suback = admin.read()
    assert suback is not None and list(suback.body[2:]) == [1]

    for clean in (False, True):
        impostor = clients.raw("gw-00001")
        impostor.send(mq.connect(admin_id, clean=clean))
        assert impostor.connack() == NOT_AUTHORIZED
    # with its own id, a device may not read the requests either
    nosy = clients.connected("gw-00001")
    nosy.send(mq.subscribe(2, ("$fleet/renew/+/request", 1)))
    refused = nosy.read()
    assert refused is not None and list(refused.body[2:]) == [0x80]

    device = clients.connected("dev-00003")
    device.send(mq.publish("$fleet/renew/dev-00003/request", b"{}", qos=1, packet_id=3))
    request = _next_publish(admin)
    assert request.topic == "$fleet/renew/dev-00003/request"


def test_a_clean0_resume_is_a_counted_takeover_and_the_books_follow_the_new_connection(
    clients: Clients, broker: BrokerThread
) -> None:
    first = clients.subscribed("dev-00004", "devices/dev-00004/commands", clean=False)
    second = clients.raw("dev-00004")
    second.send(mq.connect("dev-00004", clean=False))
    assert second.connack() == RESUMED
    assert first.closed_within(2)
    takeover = broker.wait_for_event(
        lambda e: e.get("event") == "session_closed" and e.get("reason") == "takeover"
    )
    assert takeover["peer"] == _local_address(first)
    connected = [e for e in broker.broker.events if e.get("event") == "connected"]
    assert [e["peer"] for e in connected] == [_local_address(first), _local_address(second)]
    _gold_sends_command(clients, "dev-00004", b"to the new connection")
    assert _next_publish(second).payload == b"to the new connection"
    assert broker.outcome_count("protocol_error") == 0
    second.send(mq.DISCONNECT)
    assert second.closed_within(2)
    _wait_until(lambda: _gauge(broker, "mtls_connected_devices") == 0)
    assert broker.broker.connected_devices == set()


# -- will and keep alive -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "will_topic",
    ["fleet/broadcast/ota", "devices/dev-00002/commands", "$fleet/renew/dev-00002/reply"],
)
def test_a_will_outside_the_certificate_rights_is_refused_at_connect(
    clients: Clients, broker: BrokerThread, will_topic: str
) -> None:
    observer = clients.subscribed(
        "dev-00002",
        "fleet/broadcast/#",
        "devices/dev-00002/commands",
        "$fleet/renew/dev-00002/reply",
    )
    attacker = clients.raw("dev-00001")
    attacker.send(mq.connect("dev-00001", will=(will_topic, b"forged"), will_retain=True))
    assert attacker.connack() == NOT_AUTHORIZED
    attacker.close()  # an abrupt end: a will, had it been accepted, would be published now
    _rejection(broker, "will_denied", "dev-00001")
    _gold_sends_command(clients, "dev-00002", b"marker")
    assert _next_publish(observer).payload == b"marker", "the marker, not the forged will"
    assert will_topic not in broker.broker.engine.retained


def test_keep_alive_is_enforced_and_the_will_is_published(
    clients: Clients, broker: BrokerThread
) -> None:
    watcher = clients.subscribed("watcher-00001", "devices/+/telemetry")
    pinger = clients.connected("dev-00003", keep_alive=1)
    silent = clients.connected(
        "dev-00001", keep_alive=1, will=("devices/dev-00001/telemetry", b"gone")
    )
    started = time.monotonic()
    pongs = 0
    while time.monotonic() - started < 3:  # the pinger speaks every half keep alive
        pinger.send(mq.PINGREQ)
        answer = pinger.read(0.5)
        pongs += answer is not None and answer.kind == 13
        time.sleep(max(0.0, 0.5 - (time.monotonic() - started) % 0.5))
    assert silent.closed_within(2)
    will = _next_publish(watcher)
    assert (will.topic, will.payload) == ("devices/dev-00001/telemetry", b"gone")
    event = broker.wait_for_event(
        lambda e: e.get("event") == "session_closed" and e.get("reason") == "keepalive_timeout"
    )
    assert event["device"] == "dev-00001"
    assert pongs >= 4 and not pinger.closed_within(0.1)


def test_a_client_silent_after_a_partial_connect_is_closed(
    clients: Clients, broker: BrokerThread
) -> None:
    stalled = [clients.raw("dev-00001") for _ in range(20)]
    for client in stalled:
        client.send(b"\x10\x20")  # a CONNECT's fixed header, then nothing
    for client in stalled:
        assert client.closed_within(2 + 2)
    assert broker.outcome_count("handshake_timeout") == 20
    assert clients.connected("dev-00001")


# -- malformed packets ---------------------------------------------------------------------------

MALFORMED = {
    "five-byte-remaining-length": b"\x30\xff\xff\xff\xff\x01",
    "wildcard-publish-topic": mq.publish("devices/+/telemetry", b"x"),
    "publish-qos3": mq.packet(0x36, mq.utf8("devices/dev-00001/t") + b"\x00\x01x"),
    "subscribe-length-past-packet": mq.packet(0x82, b"\x00\x01\x00\x40devices\x01"),
    "subscribe-qos-byte-3": mq.subscribe(1, ("devices/dev-00001/#", 3)),
    "reserved-type-15": b"\xf0\x00",
    "second-connect": mq.connect("dev-00001"),
    "pubrel-bad-flags": mq.packet(0x60, b"\x00\x01"),
    "server-only-connack": b"\x20\x02\x00\x00",
    "invalid-utf8-topic": mq.packet(0x30, b"\x00\x02\xc3\x28x"),
    "50-MiB-publish": b"\x30" + remaining_length(50 * 1024 * 1024),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_packet_closes_the_connection_at_once(
    clients: Clients, broker: BrokerThread, data: bytes
) -> None:
    bystander = clients.subscribed("dev-00003", "devices/dev-00003/commands")
    offender = clients.connected("dev-00001")
    offender.send(data)
    assert offender.closed_within(1.0)
    event = broker.wait_for_event(
        lambda e: e.get("event") == "session_closed" and e.get("reason") == "protocol_error"
    )
    assert event["device"] == "dev-00001" and event["detail"]
    _gold_sends_command(clients, "dev-00003", b"unaffected")
    assert _next_publish(bystander).payload == b"unaffected"


def test_an_mqtt5_connect_is_answered_unacceptable_protocol_version(
    clients: Clients, broker: BrokerThread, hostile_fleet: Workspace
) -> None:
    client = clients.raw("dev-00001")
    client.send(mq.connect_v5("dev-00001"))
    assert client.connack(timeout=1) == (0, 1)
    assert client.closed_within(1)
    creds = clients.creds("dev-00001")
    started = time.monotonic()
    result = subprocess.run(
        [require_tool("mosquitto_pub"), "-V", "mqttv5", "-h", "localhost", "-p", str(broker.port),
         "--cafile", str(hostile_fleet.paths.root_cert), "--cert", str(creds.cert),
         "--key", str(creds.key), "-i", "dev-00001", "-t", "devices/dev-00001/t", "-m", "x",
         "-D", "connect", "session-expiry-interval", "60"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert time.monotonic() - started < 5, "refused at once, not after a timeout"
    assert broker.outcome_count("protocol_error") == 2


@pytest.mark.parametrize("eku", [[], SERVER_AUTH_ONLY], ids=["no-eku", "server-auth-only"])
def test_a_fleet_certificate_without_client_auth_is_refused_in_the_handshake(
    clients: Clients, broker: BrokerThread, hostile_fleet: Workspace, tmp_path: Path, eku: list[Any]
) -> None:
    creds = issue_with_eku(hostile_fleet, tmp_path / "eku", "noeku-00001", eku)
    with pytest.raises((EOFError, OSError)):
        client = clients.raw(creds)
        client.send(mq.connect("noeku-00001"))
        client.connack()
    event = _rejection(broker, "bad_eku", "noeku-00001")
    assert "purpose" in event["detail"]
    assert clients.connected("dev-00001")


# -- helpers -------------------------------------------------------------------------------------


def _local_address(client: RawClient) -> str:
    host, port = client.sock.getsockname()[:2]
    return f"{host}:{port}"


def _gauge(broker: BrokerThread, name: str) -> float:
    return broker.broker.metrics.registry.get_sample_value(name) or 0.0


def _wait_until(condition: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)

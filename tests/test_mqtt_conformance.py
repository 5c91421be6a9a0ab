"""MQTT 3.1.1 delivery rules the broker once broke (in amqtt 0.12, its former core), each test
naming the normative statement it checks, with a raw client that shows every flag on the wire."""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import DeviceIdentity, KeyType, ProvisionSpec, Workspace, provision_devices
from fleet.kernel.keys import generate_private_key, private_key_pem
from tests import mqtt_raw as mq
from tests.broker_support import BrokerThread, Credentials, settings_for_tests
from tests.test_hostile_clients import Clients

PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK = 3, 4, 5, 6, 7, 9
TOPIC = "devices/dev-00001/telemetry"


@pytest.fixture(scope="module")
def conformance_fleet(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    from fleet import FleetConfig, init_workspace

    root = tmp_path_factory.mktemp("conformance") / "fleet"
    init_workspace(root, config=FleetConfig())
    workspace = Workspace.open(root)
    provision_devices(workspace, ProvisionSpec(count=1, prefix="dev"))
    provision_devices(workspace, ProvisionSpec(count=2, prefix="watcher", tier="silver"))
    return workspace


@pytest.fixture
def clients(conformance_fleet: Workspace) -> Iterator[Clients]:
    broker = BrokerThread(settings_for_tests(conformance_fleet))
    made = Clients(conformance_fleet, broker)
    yield made
    made.close()
    broker.stop()


def _qos(packet: mq.Received) -> int:
    return (packet.flags >> 1) & 3


def _dup(packet: mq.Received) -> bool:
    return bool(packet.flags & 0x08)


def _retain(packet: mq.Received) -> bool:
    return bool(packet.flags & 0x01)


def _subscribe(client: mq.RawClient, topic_filter: str, qos: int, packet_id: int = 1) -> int:
    client.send(mq.subscribe(packet_id, (topic_filter, qos)))
    suback = client.read()
    assert suback is not None and suback.kind == SUBACK
    return suback.body[2]


def _publish(clients: Clients, payload: bytes, qos: int, *, retain: bool = False) -> None:
    publisher = clients.connected("dev-00001")
    body = mq.utf8(TOPIC) + (struct.pack("!H", 7) if qos else b"") + payload
    publisher.send(mq.packet(0x30 | (qos << 1) | int(retain), body))
    if qos:
        ack = publisher.read()
        assert ack is not None and ack.kind == (PUBACK if qos == 1 else PUBREC)
    if qos == 2:  # released, then complete
        publisher.send(mq.packet(0x62, struct.pack("!H", 7)))
        complete = publisher.read()
        assert complete is not None and complete.kind == PUBCOMP
    publisher.send(mq.DISCONNECT)


def _next_publish(client: mq.RawClient, timeout: float = 5) -> mq.Received:
    packet = client.read(timeout)
    assert packet is not None and packet.kind == PUBLISH, packet
    return packet


def test_delivered_qos_is_the_lower_of_published_and_granted(clients: Clients) -> None:
    """[MQTT-3.8.4-6] The QoS of Payload Messages sent in response to a Subscription MUST be the
    minimum of the QoS of the originally published message and the maximum QoS granted."""
    high = clients.connected("watcher-00001")
    assert _subscribe(high, "devices/+/telemetry", 2) == 2
    _publish(clients, b"at qos 0", 0)
    assert _qos(_next_publish(high)) == 0  # not raised to the subscription's 2
    _publish(clients, b"at qos 1", 1)
    received = _next_publish(high)
    assert (received.payload, _qos(received)) == (b"at qos 1", 1)
    high.send(mq.puback(received.packet_id))


def test_a_second_subscribe_to_a_filter_replaces_its_qos(clients: Clients) -> None:
    """[MQTT-3.8.4-3] A SUBSCRIBE whose filter is identical to an existing subscription's MUST
    replace that subscription (with the new maximum QoS)."""
    watcher = clients.connected("watcher-00001")
    assert _subscribe(watcher, "devices/+/telemetry", 0, packet_id=1) == 0
    assert _subscribe(watcher, "devices/+/telemetry", 1, packet_id=2) == 1
    _publish(clients, b"after the upgrade", 1)
    received = _next_publish(watcher)
    assert _qos(received) == 1  # the new subscription's QoS, not the first one's 0
    watcher.send(mq.puback(received.packet_id))
    assert watcher.read(0.5) is None, "one subscription, so one copy"


def test_an_unacknowledged_delivery_is_resent_with_dup_when_the_session_resumes(
    clients: Clients,
) -> None:
    """[MQTT-4.4.0-1] When a Client reconnects with CleanSession 0, the Server MUST re-send any
    unacknowledged PUBLISH packets (QoS 1 and 2) using their original packet identifiers;
    [MQTT-3.3.1-1] with DUP set. Waiting longer than amqtt's 5 s loses nothing."""
    watcher = clients.connected("watcher-00001", clean=False)
    assert _subscribe(watcher, "devices/+/telemetry", 1) == 1
    _publish(clients, b"ack me later", 1)
    first = _next_publish(watcher)
    assert not _dup(first)
    assert watcher.read(6) is None  # no resend within the connection, and not forgotten either
    watcher.close()  # gone without acknowledging

    back = clients.raw("watcher-00001")
    back.send(mq.connect("watcher-00001", clean=False))
    assert back.connack() == (1, 0)  # session present
    again = _next_publish(back)
    assert (again.payload, again.packet_id, _dup(again)) == (b"ack me later", first.packet_id, True)
    back.send(mq.puback(again.packet_id))
    back.send(mq.DISCONNECT)
    back.close()

    third = clients.raw("watcher-00001")
    third.send(mq.connect("watcher-00001", clean=False))
    assert third.connack() == (1, 0)
    assert third.read(1) is None, "acknowledged: never sent again"


def test_a_qos2_delivery_resumes_with_its_pubrel(clients: Clients) -> None:
    """[MQTT-4.4.0-1] ... and re-send any unacknowledged PUBREL packets."""
    watcher = clients.connected("watcher-00001", clean=False)
    assert _subscribe(watcher, "devices/+/telemetry", 2) == 2
    _publish(clients, b"exactly once", 2)
    delivery = _next_publish(watcher)
    assert _qos(delivery) == 2
    watcher.send(mq.packet(0x50, struct.pack("!H", delivery.packet_id)))  # PUBREC
    pubrel = watcher.read()
    assert pubrel is not None and pubrel.kind == PUBREL
    watcher.close()  # before PUBCOMP

    back = clients.raw("watcher-00001")
    back.send(mq.connect("watcher-00001", clean=False))
    assert back.connack() == (1, 0)
    resent = back.read()
    assert resent is not None and resent.kind == PUBREL, resent  # the PUBLISH is not repeated
    assert struct.unpack("!H", resent.body[:2])[0] == delivery.packet_id
    back.send(mq.packet(0x70, struct.pack("!H", delivery.packet_id)))  # PUBCOMP
    assert back.read(1) is None


def test_a_message_kept_for_an_offline_session_arrives_once_with_retain_0(
    clients: Clients,
) -> None:
    """[MQTT-3.3.1-9] The Server MUST set RETAIN to 0 when a PUBLISH is sent because it matches
    an established subscription, whatever the flag of the message it received; retained
    messages are sent for a new subscription only [MQTT-3.3.1-6] (amqtt also replayed them at
    every resumption, so a message published while the device was away arrived twice)."""
    watcher = clients.connected("watcher-00001", clean=False)
    assert _subscribe(watcher, "devices/+/telemetry", 1) == 1
    watcher.send(mq.DISCONNECT)
    watcher.close()
    _publish(clients, b"while you were away", 1, retain=True)

    back = clients.raw("watcher-00001")
    back.send(mq.connect("watcher-00001", clean=False))
    assert back.connack() == (1, 0)
    kept = _next_publish(back)
    assert (kept.payload, _retain(kept)) == (b"while you were away", False)
    back.send(mq.puback(kept.packet_id))
    assert back.read(1) is None, "once, not again as a retained message"

    fresh = clients.connected("watcher-00001")  # a new subscription gets the retained copy
    assert _subscribe(fresh, "devices/+/telemetry", 1) == 1
    retained = _next_publish(fresh)
    assert (retained.payload, _retain(retained)) == (b"while you were away", True)


def test_overlapping_subscriptions_deliver_one_copy_at_the_highest_qos(clients: Clients) -> None:
    """[MQTT-3.3.5-1] When a message matches several subscriptions of one client, the Server
    MUST deliver it respecting the maximum QoS of all the matching subscriptions (one copy)."""
    watcher = clients.connected("watcher-00001")
    assert _subscribe(watcher, "devices/+/telemetry", 1, packet_id=1) == 1
    assert _subscribe(watcher, TOPIC, 2, packet_id=2) == 2
    _publish(clients, b"matches two filters", 2)
    received = _next_publish(watcher)
    assert (received.payload, _qos(received)) == (b"matches two filters", 2)
    watcher.send(mq.packet(0x50, struct.pack("!H", received.packet_id)))  # PUBREC
    pubrel = watcher.read()
    assert pubrel is not None and pubrel.kind == PUBREL
    watcher.send(mq.packet(0x70, struct.pack("!H", received.packet_id)))  # PUBCOMP
    assert watcher.read(0.5) is None, "one copy, not one per matching filter"


def test_a_resumed_session_keeps_only_what_the_certificate_in_hand_may_read(
    clients: Clients, conformance_fleet: Workspace, tmp_path: Path
) -> None:
    """A stored session was granted under one certificate; resumed under another certificate of
    the same device with fewer rights (a silver device re-issued as bronze), its subscriptions
    beyond the new rights are dropped before anything is delivered, and the QoS 1 message kept
    for it on such a filter is not handed over. A silver bystander still receives."""
    watcher = clients.connected("watcher-00001", clean=False)
    assert _subscribe(watcher, "devices/+/telemetry", 1) == 1  # silver's right
    watcher.send(mq.DISCONNECT)
    watcher.close()
    bystander = clients.subscribed("watcher-00002", "devices/+/telemetry")
    _publish(clients, b"kept while away", 1)
    assert _next_publish(bystander).payload == b"kept while away"

    bronze = _certificate_with_tier(conformance_fleet, "watcher-00001", "bronze", tmp_path)
    back = clients.raw(bronze)
    back.send(mq.connect("watcher-00001", clean=False))
    assert back.connack() == (1, 0)  # its session, resumed
    assert back.read(1) is None, "nothing a bronze certificate may not read"
    _publish(clients, b"after the resume", 1)
    assert back.read(1) is None
    assert _next_publish(bystander).payload == b"after the resume"
    assert _subscribe(back, "devices/+/telemetry", 1, packet_id=5) == 0x80


def _certificate_with_tier(
    workspace: Workspace, device_id: str, tier: str, directory: Path
) -> Credentials:
    now = dt.datetime.now(dt.UTC)
    key = generate_private_key(KeyType.EC_P256)
    identity = DeviceIdentity(
        device_id=device_id, tier=tier, env="prod", trust_domain=workspace.config.trust_domain
    )
    cert = workspace.ca.issue_device(
        identity, key.public_key(), not_before=now, not_after=now + dt.timedelta(hours=1)
    )
    (directory / "cert.pem").write_bytes(workspace.ca.chain_pem(cert))
    (directory / "key.pem").write_bytes(private_key_pem(key))
    return Credentials(device_id, directory / "cert.pem", directory / "key.pem")

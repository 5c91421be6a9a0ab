"""Lifecycle events on MQTT ($fleet/events/...): what the broker publishes, who may read them,
that nobody else can publish there, and that every payload fits its JSON schema."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from broker.policy import PolicyError, parse_policy
from fleet import ProvisionSpec, Workspace, provision_devices, revoke_device
from fleet.kernel.keys import private_key_pem
from fleet.kernel.lifecycle import (
    ANONYMOUS,
    EVENTS_FILTER,
    EventRejected,
    Lifecycle,
    event_topic,
    parse_event,
    schema,
    topic_level,
)
from fleet.store.workspace import ADMIN_NAME, ensure_admin_certificate
from tests import mqtt_raw as mq
from tests.broker_support import (
    BrokerThread,
    Credentials,
    device_credentials,
    paho_device,
    settings_for_tests,
)
from tests.conftest import require_tool

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class EventSubscriber:
    """``mosquitto_sub`` as the control plane's admin, printing every event it receives."""

    def __init__(self, workspace: Workspace, port: int, topic_filter: str = EVENTS_FILTER) -> None:
        ensure_admin_certificate(workspace)
        paths = workspace.paths
        self.process = subprocess.Popen(
            ["stdbuf", "-oL", require_tool("mosquitto_sub"), "-h", "localhost", "-p", str(port),
             "--cafile", str(paths.root_cert), "--cert", str(paths.admin_cert),
             "--key", str(paths.admin_key), "-i", f"admin:{ADMIN_NAME}", "-t", topic_filter,
             "-v", "-d"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed = threading.Condition()
        self._subscribed = False
        threading.Thread(target=self._read, daemon=True).start()
        with self._changed:
            assert self._changed.wait_for(lambda: self._subscribed, 10), "mosquitto_sub: no SUBACK"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                if "received SUBACK" in line:
                    self._subscribed = True
                elif line.startswith("$fleet/events/"):
                    topic, _, payload = line.rstrip("\n").partition(" ")
                    self.events.append((topic, json.loads(payload)))
                self._changed.notify_all()

    def wait_for(self, kind: str, device: str | None, timeout: float = 10) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for topic, payload in self.events:
                if payload["event"] == kind and payload.get("device") == device:
                    assert topic == event_topic(Lifecycle(kind), device)
                    return payload
            return None

        with self._changed:
            assert self._changed.wait_for(lambda: found() is not None, timeout), (
                f"no {kind} event of {device} in {self.events}"
            )
            event = found()
            assert event is not None
            return event

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _attempt(port: int, ca: Path, creds: Credentials) -> None:
    """One TLS attempt that the broker is expected to refuse (its alert may come at once)."""
    with contextlib.suppress(OSError):
        mq.RawClient(port, ca, creds).send(mq.connect(creds.device_id))


def _self_signed(directory: Path, common_name: str) -> Credentials:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (directory / "cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    (directory / "key.pem").write_bytes(private_key_pem(key))
    return Credentials(common_name, directory / "cert.pem", directory / "key.pem")


def _validate(payload: dict[str, Any]) -> None:
    jsonschema_rs.validate(schema(Lifecycle(payload["event"])), payload)


def test_connect_disconnect_revoke_and_a_foreign_certificate_are_published_to_the_admin(
    workspace: Workspace, tmp_path: Path
) -> None:
    ids = provision_devices(workspace, ProvisionSpec(count=3, tier="silver")).device_ids
    quitter, victim, bystander_id = ids
    broker = BrokerThread(settings_for_tests(workspace))
    subscriber = EventSubscriber(workspace, broker.port)
    ca = workspace.paths.root_cert
    try:
        bystander = paho_device(broker.port, ca, device_credentials(workspace, bystander_id))
        assert bystander.connected.wait(10)
        bystander.client.subscribe(f"devices/{bystander_id}/#", qos=1)
        assert bystander.subscribed.wait(10)
        connected = subscriber.wait_for("connected", bystander_id)
        assert (connected["tier"], connected["env"], connected["role"]) == (
            "silver",
            "prod",
            "device",
        )
        assert connected["client_id"] == bystander_id and connected["keep_alive"] == 60
        # paho on Python's ssl (OpenSSL 3.0) offers X25519 first and signs with its P-256 key
        assert (connected["group"], connected["signature"]) == ("x25519", "ecdsa_secp256r1_sha256")
        serial = workspace.registry.get(bystander_id).serial
        assert connected["serial"] == format(serial, "X")

        leaving = paho_device(broker.port, ca, device_credentials(workspace, quitter))
        assert leaving.connected.wait(10)
        leaving.stop()
        left = subscriber.wait_for("disconnected", quitter)
        assert left["reason"] == "client" and 0 <= left["session_seconds"] < 10

        held = paho_device(broker.port, ca, device_credentials(workspace, victim))
        assert held.connected.wait(10)
        subscriber.wait_for("connected", victim)
        revoke_device(workspace, victim)
        cut = subscriber.wait_for("disconnected", victim)
        assert cut["reason"] == "revoked"
        held.stop()
        _attempt(broker.port, ca, device_credentials(workspace, victim))
        refused = subscriber.wait_for("rejected", victim)
        assert (refused["reason"], refused["stage"]) == ("revoked", "tls")
        assert refused["serial"] == format(workspace.registry.get(victim).serial, "X")

        hostile = _self_signed(tmp_path, "sensor/+#x")  # a name no topic level may hold
        _attempt(broker.port, ca, hostile)
        unknown = subscriber.wait_for("rejected", "sensor/+#x")
        assert unknown["reason"] == "unknown_ca" and unknown["issuer"] != connected["issuer"]

        # the bystander was never touched and is still served
        bystander.client.publish(f"devices/{bystander_id}/t", b"still here", qos=1)
        assert bystander.message_arrived.wait(10)
        assert bystander.messages == [(f"devices/{bystander_id}/t", b"still here")]
        bystander.stop()
    finally:
        subscriber.stop()
        broker.stop()
    topics = [topic for topic, _ in subscriber.events]
    assert "$fleet/events/rejected/sensor___x" in topics  # made safe for one topic level
    for _, payload in subscriber.events:
        _validate(payload)
    kinds = {payload["event"] for _, payload in subscriber.events}
    assert kinds == {"connected", "disconnected", "rejected"}


def test_devices_may_not_read_events_or_publish_them_unless_a_policy_grants_reading(
    workspace: Workspace, tmp_path: Path
) -> None:
    ids = provision_devices(workspace, ProvisionSpec(count=2, tier="gold")).device_ids
    watcher, forger = ids
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "rules:\n"
        "  - name: own\n    publish: ['devices/{id}/#', '#']\n"
        "    subscribe: ['devices/{id}/#', '$fleet/events/+/{id}']\n"
    )
    broker = BrokerThread(settings_for_tests(workspace, policy=policy))
    subscriber = EventSubscriber(workspace, broker.port)
    ca = workspace.paths.root_cert
    try:
        reader = paho_device(broker.port, ca, device_credentials(workspace, watcher))
        assert reader.connected.wait(10)
        reader.client.subscribe(EVENTS_FILTER, qos=0)  # everyone's: refused
        assert reader.subscribed.wait(10)
        assert reader.granted == [0x80]
        reader.subscribed.clear()
        reader.client.subscribe(f"$fleet/events/+/{watcher}", qos=0)  # its own: granted
        assert reader.subscribed.wait(10)
        assert reader.granted == [0x80, 0]

        forging = paho_device(broker.port, ca, device_credentials(workspace, forger))
        assert forging.connected.wait(10)
        forged = json.dumps({"event": "disconnected", "reason": "revoked"})
        info = forging.client.publish(f"$fleet/events/disconnected/{watcher}", forged, qos=1)
        info.wait_for_publish(10)
        broker.wait_for_event(lambda e: e["event"] == "acl_denied" and e.get("device") == forger)
        forging.stop()
        subscriber.wait_for("disconnected", forger)  # the broker's own event, after the forgery
        assert reader.messages == [], "a device's publish reached an event topic"
        # its own events reach it: a second session of the same id takes the first over
        second = paho_device(broker.port, ca, device_credentials(workspace, watcher))
        assert second.connected.wait(10)
        taken = subscriber.wait_for("disconnected", watcher)
        assert taken["reason"] == "takeover"
        second.stop()
    finally:
        subscriber.stop()
        broker.stop()
    assert all(p.get("reason") != "revoked" for _, p in subscriber.events)
    assert [p["event"] for _, p in subscriber.events if p["device"] == forger] == [
        "connected",
        "disconnected",
    ]


@pytest.mark.parametrize(
    "grant", ["$fleet/events/connected/{id}", "$fleet/#", "$fleet/+/+/{id}", "$fleet/events/#"]
)
def test_a_policy_may_not_grant_publishing_events(grant: str) -> None:
    text = f"rules:\n  - name: r\n    publish: ['{grant}']\n"
    with pytest.raises(PolicyError) as raised:
        parse_policy(text, Path("p.yaml"))
    assert "only the broker publishes on $fleet/events/#" in str(raised.value)
    parse_policy(f"rules:\n  - name: r\n    subscribe: ['{grant}']\n", Path("p.yaml"))


def test_topic_levels_are_safe_and_events_round_trip() -> None:
    assert topic_level(None) == ANONYMOUS and topic_level("") == ANONYMOUS
    assert topic_level("a/b+c#d\x00") == "a_b_c_d_"
    assert len(topic_level("x" * 500)) == 64
    payload = {
        "event": "rejected", "ts": "2026-12-07T10:00:00.000+00:00", "device": None,
        "serial": None, "issuer": None, "peer": "127.0.0.1:5", "stage": "tls",
        "reason": "no_certificate", "detail": None,
    }  # fmt: skip
    _validate(payload)
    event = parse_event(event_topic(Lifecycle.REJECTED, None), json.dumps(payload).encode())
    assert (event.kind, event.reason, event.device) == (Lifecycle.REJECTED, "no_certificate", None)


@pytest.mark.parametrize(
    ("topic", "data", "problem"),
    [
        ("$fleet/events/connected", b"{}", "is not $fleet/events/<kind>/<id>"),
        ("$fleet/events/born/a", b"{}", "unknown event kind 'born'"),
        ("$fleet/events/connected/a", b"[]", "expected a JSON object"),
        ("$fleet/events/connected/a", b'{"event":"rejected","ts":"t"}', "as the topic says"),
        ("$fleet/events/rejected/a", b'{"event":"rejected","ts":"t","reason":"ok"}', "not a rejected reason"),
        ("$fleet/events/disconnected/a", b'{"event":"disconnected","ts":"t"}', "field 'reason'"),
        ("$fleet/events/connected/a", b'{"event":"connected","ts":"t","a":{"b":{"c":1}}}', "nested 3 deep"),
        ("$fleet/events/connected/a", b'{"event":"connected"}', "field 'ts'"),
        ("$fleet/events/connected/a", b"x" * 5000, "larger than 4096 bytes"),
    ],
)  # fmt: skip
def test_a_bad_event_is_refused_with_the_reason(topic: str, data: bytes, problem: str) -> None:
    with pytest.raises(EventRejected) as raised:
        parse_event(topic, data)
    assert problem in str(raised.value)


@given(st.text(max_size=80), st.binary(max_size=300))
def test_any_message_is_an_event_or_refused_with_event_rejected(topic: str, data: bytes) -> None:
    try:
        event = parse_event(topic, data)
    except EventRejected:
        return
    assert event.kind in set(Lifecycle)


@given(
    st.sampled_from(list(Lifecycle)),
    st.dictionaries(
        st.sampled_from(["ts", "device", "serial", "peer", "reason", "tier", "env", "session_seconds"]),
        st.one_of(st.none(), st.text(max_size=20), st.integers(), st.floats(), st.booleans()),
    ),
)  # fmt: skip
def test_any_json_object_on_an_event_topic_parses_or_is_refused(
    kind: Lifecycle, fields: dict[str, Any]
) -> None:
    try:
        data = json.dumps({"event": kind.value, **fields}).encode()
    except ValueError:
        return
    try:
        event = parse_event(event_topic(kind, "d"), data)
    except EventRejected:
        return
    assert isinstance(event.ts, str)

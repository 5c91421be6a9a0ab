"""The controller against hostile requests: bounded parsing, isolated requests, whole-string ids,
OCSP and HTTP edge cases, and ``fleet serve --api-port`` through the CLI process."""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from hypothesis import given
from hypothesis import strategies as st

from broker import BrokerSettings
from device.requests import prepare_enrollment, prepare_renewal
from fleet import ProvisionSpec, UsageError, Workspace, provision_devices
from fleet.controlplane.server import ControlPlane
from fleet.kernel.bounded_json import JsonRejected, loads_bounded
from fleet.kernel.identity import validate_device_id
from fleet.kernel.mqtt_api import is_request_id, parse_request_topic, request_timestamp
from fleet.store.certificate_requests import CertificateRequests
from fleet.store.claims import ClaimRules, create_claim
from tests import mqtt_raw as mq
from tests.broker_support import BrokerThread, device_credentials
from tests.conftest import fleet_command

# -- bounded JSON --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**15), 10**15) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_json_within_the_limits_reads_back(value: Any) -> None:
    data = json.dumps(value).encode()
    if len(data) <= 4096:
        assert loads_bounded(data, max_bytes=4096) == value


@given(st.binary(max_size=300))
def test_random_bytes_are_json_or_rejected_by_name(data: bytes) -> None:
    try:
        loads_bounded(data, max_bytes=4096)
    except JsonRejected as exc:
        assert str(exc)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"[" * 60_000, "nested 60000 deep"),
        (b'{"a": ' + b"9" * 5000 + b"}", "a number of 5000 characters"),
        (b"[NaN]", "NaN is not JSON"),
        (b'{"a": 1e999}', "out of range"),
        (b"x" * 70_000, "larger than 65536 bytes"),
        (b'"\xff"', "not UTF-8"),
    ],
)
def test_hostile_json_is_rejected_before_any_work(data: bytes, why: str) -> None:
    with pytest.raises(JsonRejected, match=why):
        loads_bounded(data, max_bytes=65536)


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    assert loads_bounded(json.dumps({"a": "[[[[[[[[[[[[[[[[[[[[[[[["}).encode(), max_bytes=100)


# -- identifiers validated whole -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["sensor-b1\n", "sensor-b1\r", "\nsensor-b1", "sensor b1"])
def test_ids_with_control_characters_or_newlines_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        validate_device_id(text)
    assert not is_request_id(f"abcdefgh{text}")
    assert parse_request_topic(f"$fleet/renew/{text}/request") is None


def test_a_trailing_newline_does_not_make_a_request_topic() -> None:
    assert parse_request_topic("$fleet/renew/sensor-1/request") == ("renew", "sensor-1")
    assert parse_request_topic("$fleet/renew/sensor-1/request\n") is None


# -- the control plane's MQTT worker -------------------------------------------------------------


@pytest.fixture
def control_plane_on_broker(
    workspace: Workspace,
) -> Iterator[tuple[Workspace, BrokerThread, ControlPlane]]:
    provision_devices(workspace, ProvisionSpec(count=2, prefix="dev"))
    broker = BrokerThread(
        BrokerSettings(workspace=workspace.paths.root, port=0, metrics_port=None, event_log=False)
    )
    plane = ControlPlane(workspace, port=0)
    plane.start()
    plane.answer_requests("localhost", broker.port)
    try:
        yield workspace, broker, plane
    finally:
        plane.stop()
        broker.stop()


def _health(plane: ControlPlane) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{plane.url}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_hostile_renewal_messages_are_refused_one_by_one_and_the_worker_lives(
    control_plane_on_broker: tuple[Workspace, BrokerThread, ControlPlane],
) -> None:
    workspace, broker, plane = control_plane_on_broker
    device = mq.RawClient(
        broker.port, workspace.paths.root_cert, device_credentials(workspace, "dev-00001")
    )
    try:
        device.send(mq.connect("dev-00001"))
        assert device.connack() == (0, 0)
        device.send(mq.subscribe(1, ("$fleet/renew/dev-00001/reply", 1)))
        assert device.read() is not None
        hostile = [
            b"[" * 60_000,  # deep nesting (under the 64 KiB message limit)
            b'{"request_id": ' + b"7" * 5000 + b"}",  # a 5,000-digit integer
            b'{"request_id": "r1", "csr": [], "certificate": "", "signature": ""}',
        ]
        for index, payload in enumerate(hostile, start=1):
            device.send(
                mq.publish("$fleet/renew/dev-00001/request", payload, qos=1, packet_id=index)
            )
        replies: list[dict[str, Any]] = []
        while len(replies) < len(hostile):
            packet = device.read(10)
            assert packet is not None, f"only {len(replies)} replies"
            if packet.kind == 3:
                replies.append(json.loads(packet.payload))
                device.send(mq.puback(packet.packet_id))
        assert [(r["status"], r["reason"]) for r in replies] == [("refused", "bad_request")] * 3
        assert "nested" in replies[0]["message"] and "5000" in replies[1]["message"]
        assert (
            plane.metrics.get_sample_value("fleet_renewals_total", {"outcome": "bad_request"}) == 3
        )
        assert _health(plane) == (200, {"status": "ok", "problems": []})
    finally:
        device.close()
    broker.call(broker.broker.stop())  # the broker goes away: health says so
    deadline = time.monotonic() + 10
    while (status := _health(plane))[0] == 200:
        assert time.monotonic() < deadline, "healthz kept saying ok without a broker"
        time.sleep(0.1)
    assert status[0] == 503 and "not connected to the broker" in status[1]["problems"][0]


# -- HTTP and OCSP edges -------------------------------------------------------------------------


@pytest.fixture
def plane(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlPlane]:
    monkeypatch.setattr("fleet.controlplane.server._IDLE_SECONDS", 1)
    provision_devices(workspace, ProvisionSpec(count=1, prefix="dev"))
    served = ControlPlane(workspace, port=0)
    served.start()
    yield served
    served.stop()


def _post_raw(plane: ControlPlane, head: bytes, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", plane.port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1]


def _ocsp_request(workspace: Workspace) -> bytes:
    cert = x509.load_pem_x509_certificate(workspace.paths.device_cert("dev-00001").read_bytes())
    builder = ocsp.OCSPRequestBuilder().add_certificate(
        cert, workspace.ca.issuing_cert, hashes.SHA256()
    )
    return builder.build().public_bytes(Encoding.DER)


SHA256_OID = bytes.fromhex("0609608648016503040201")
UNKNOWN_OID = bytes.fromhex("060960864801650304027f")


def test_ocsp_requests_it_cannot_read_get_malformed_request_and_the_server_serves_on(
    workspace: Workspace, plane: ControlPlane
) -> None:
    good = _ocsp_request(workspace)
    unknown_hash = good.replace(SHA256_OID, UNKNOWN_OID)
    assert unknown_hash != good
    answers = [
        _post_raw(
            plane,
            b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(unknown_hash)).encode()
            + b"\r\nConnection: close\r\n\r\n",
            unknown_hash,
        ),
        _post_raw(
            plane,
            b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\nConnection: close\r\n\r\n",
            b"",
        ),
    ]  # fmt: skip
    for answer in answers:
        parsed = ocsp.load_der_ocsp_response(answer)
        assert parsed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    fine = _post_raw(
        plane,
        b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(good)).encode()
        + b"\r\nConnection: close\r\n\r\n",
        good,
    )  # fmt: skip
    assert ocsp.load_der_ocsp_response(fine).certificate_status is ocsp.OCSPCertStatus.GOOD


def test_an_idle_http_connection_is_closed(plane: ControlPlane) -> None:
    with socket.create_connection(("127.0.0.1", plane.port), timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(1) == b""
        assert time.monotonic() - started < 5


# -- the admin API: 4xx naming the field for every bad input ---------------------------------


def test_hostile_admin_bodies_get_a_400_naming_the_field(workspace: Workspace) -> None:
    plane = ControlPlane(workspace, port=0)
    plane.start()
    plane.serve_admin_api(port=0)
    assert plane.api is not None
    context = ssl.create_default_context(cafile=str(workspace.paths.root_cert))
    context.load_cert_chain(workspace.paths.admin_cert, workspace.paths.admin_key)
    cases: list[tuple[str, bytes, str]] = [
        ("/v1/devices", b"[" * 5000, ""),
        ("/v1/devices", b'{"count": ' + b"9" * 5000 + b"}", ""),
        ("/v1/devices", b'{"count": 1, "valid_for": "99999999999999d"}', "valid_for"),
        ("/v1/devices", b'{"count": 1, "valid_for": "9999999d"}', "valid_for"),
        ("/v1/devices", b'{"count": 1, "tier": "platinum"}', "tier"),
        ("/v1/devices", b'{"count": 1, "env": "staging"}', "env"),
        ("/v1/claims", b'{"name": "evil\\n"}', "name"),
        ("/v1/claims", b'{"name": "ok", "tier": "platinum"}', "tier"),
    ]
    try:
        for path, body, field in cases:
            request = urllib.request.Request(
                f"https://localhost:{plane.api.port}{path}", data=body, method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as raised:
                urllib.request.urlopen(request, context=context, timeout=10)
            answer = json.loads(raised.value.read())
            assert raised.value.code == 400, (path, body[:40], answer)
            assert answer.get("field", "") == field, (path, body[:40], answer)
        assert workspace.registry.devices() == [] and workspace.registry.claims() == []
    finally:
        plane.stop()


def test_fleet_serve_api_port_serves_the_admin_api(workspace: Workspace, tmp_path: Path) -> None:
    provision_devices(workspace, ProvisionSpec(count=2, prefix="dev"))
    process = subprocess.Popen(
        fleet_command("serve", "--dir", workspace.paths.root, "--port", "0", "--api-port", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("serving http://127.0.0.1:")
        line = process.stdout.readline()
        assert line.startswith("admin API on https://127.0.0.1:"), line
        url = line.split()[3].replace("127.0.0.1", "localhost")
        listed = subprocess.run(
            fleet_command("inventory", "--dir", tmp_path / "elsewhere", "--server", url,
                          "--admin", workspace.paths.admin_dir, "--json"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert [d["id"] for d in json.loads(listed.stdout)["devices"]] == ["dev-00001", "dev-00002"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


# -- replay-proof requests -----------------------------------------------------------------------


def _edited(payload: bytes, **changes: str) -> bytes:
    body = json.loads(payload)
    body.update(changes)
    return json.dumps(body).encode()


def test_a_captured_renewal_cannot_be_replayed_or_rebound(workspace: Workspace) -> None:
    (device_id,) = provision_devices(workspace, ProvisionSpec(count=1, prefix="dev")).device_ids
    paths = workspace.paths
    captured = prepare_renewal(device_id, paths.device_cert(device_id), paths.device_key(device_id))
    first = CertificateRequests(workspace).renew(device_id, captured.payload)
    assert first.issued
    again = CertificateRequests(workspace)  # a restarted control plane forgets nothing
    fresh_id = _edited(captured.payload, request_id="attacker-0001")
    restamped = request_timestamp(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=61))
    later = _edited(captured.payload, timestamp=restamped)
    answers = [
        again.renew(device_id, captured.payload).reason,
        again.renew(device_id, fresh_id).reason,
        again.renew(device_id, later).reason,
    ]
    assert answers == ["request_replayed", "bad_signature", "bad_signature"]
    statuses = [status for _, status, *_ in workspace.registry.certificate_history(device_id)]
    assert statuses == ["superseded", "active"], "one renewal, however many replays"


def test_an_old_request_is_refused_as_stale(workspace: Workspace) -> None:
    (device_id,) = provision_devices(workspace, ProvisionSpec(count=1, prefix="dev")).device_ids
    paths = workspace.paths
    request = prepare_renewal(device_id, paths.device_cert(device_id), paths.device_key(device_id))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)
    reply = CertificateRequests(workspace).renew(device_id, request.payload, now=later)
    assert (reply.status, reply.reason) == ("refused", "stale_request")
    assert "away from the control plane's clock" in reply.message


def test_a_captured_enrollment_cannot_be_replayed_or_rebound(workspace: Workspace) -> None:
    create_claim(workspace, ClaimRules("batch-9"))
    claim = workspace.paths.claim_dir("batch-9")
    captured = prepare_enrollment("sensor-1", claim / "cert.pem", claim / "key.pem")
    assert CertificateRequests(workspace).enroll(captured.request_id, captured.payload).issued
    again = CertificateRequests(workspace)
    other_device = _edited(captured.payload, device_id="sensor-2")
    answers = [
        again.enroll(captured.request_id, captured.payload).reason,
        again.enroll("attacker-0002", captured.payload).reason,
        again.enroll(captured.request_id + "x", other_device).reason,
    ]
    assert answers == ["request_replayed", "bad_signature", "bad_signature"]
    assert [r.device_id for r in workspace.registry.devices()] == ["sensor-1"]


def test_a_not_yet_valid_device_cannot_renew_into_a_valid_certificate(
    workspace: Workspace,
) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    (device_id,) = provision_devices(
        workspace, ProvisionSpec(count=1, prefix="future", not_before=soon)
    ).device_ids
    paths = workspace.paths
    request = prepare_renewal(device_id, paths.device_cert(device_id), paths.device_key(device_id))
    reply = CertificateRequests(workspace).renew(device_id, request.payload)
    assert (reply.status, reply.reason) == ("refused", "certificate_not_yet_valid")

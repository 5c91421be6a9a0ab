"""The mTLS broker on real sockets, driven by Mosquitto's clients, openssl and paho."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import BrokerError, RevocationPolicy, launched_broker, listening_port
from device.outcomes import alert_name
from fleet import (
    FleetConfig,
    ProvisionSpec,
    Workspace,
    init_workspace,
    provision_devices,
    revoke_device,
)
from tests.broker_support import (
    SERVER_AUTH_ONLY,
    BrokerThread,
    Credentials,
    device_credentials,
    issue_with_eku,
    mosquitto_pub,
    paho_device,
    running_mosquitto,
    settings_for_tests,
    tls_context,
)
from tests.conftest import fleet_command, openssl


def _provision(ws: Workspace, count: int, prefix: str, **options: object) -> list[str]:
    return provision_devices(ws, ProvisionSpec(count=count, prefix=prefix, **options)).device_ids  # type: ignore[arg-type]


@pytest.fixture
def fleet(workspace: Workspace) -> Workspace:
    now = dt.datetime.now(dt.UTC)
    _provision(workspace, 4, "dev")
    _provision(workspace, 1, "watcher", tier="silver")
    _provision(workspace, 1, "gw", tier="gold")
    _provision(workspace, 1, "lab", env="dev")
    _provision(
        workspace, 1, "old", not_before=now - dt.timedelta(days=2), valid_for=dt.timedelta(days=1)
    )
    _provision(workspace, 1, "future", not_before=now + dt.timedelta(days=1))
    return workspace


@pytest.fixture
def running(fleet: Workspace) -> Iterator[BrokerThread]:
    broker = BrokerThread(settings_for_tests(fleet))
    yield broker
    broker.stop()


def _creds(ws: Workspace, device_id: str) -> Credentials:
    return device_credentials(ws, device_id)


def _closed_session_of(device_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "session_closed" and e.get("device") == device_id


def _rejection(running: BrokerThread, reason: str) -> dict[str, Any]:
    return running.wait_for_event(
        lambda e: e.get("event") == "rejected" and e.get("reason") == reason
    )


# -- delivery and identity ----------------------------------------------------------------------


def test_mosquitto_pub_delivers_to_a_silver_subscriber(
    fleet: Workspace, running: BrokerThread
) -> None:
    ca = fleet.paths.root_cert
    watcher = paho_device(running.port, ca, _creds(fleet, "watcher-00001"))
    try:
        assert watcher.connected.wait(10), watcher.reason
        watcher.client.subscribe("devices/+/telemetry", qos=1)
        assert watcher.subscribed.wait(10) and watcher.granted == [1]
        result = mosquitto_pub(
            running.port, ca, _creds(fleet, "dev-00001"), "devices/dev-00001/telemetry", "21.5"
        )
        assert result.returncode == 0, result.stderr
        assert watcher.message_arrived.wait(10)
        assert watcher.messages == [("devices/dev-00001/telemetry", b"21.5")]
    finally:
        watcher.stop()
    assert running.outcome_count("ok") == 2


def _rogue_credentials(tmp_path: Path) -> Credentials:
    rogue = init_workspace(tmp_path / "rogue", config=FleetConfig())
    rogue_ws = Workspace.open(rogue.paths.root)
    provision_devices(rogue_ws, ProvisionSpec(count=1, prefix="dev"))  # same id as a real device
    return device_credentials(rogue_ws, "dev-00001")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no-certificate", "no_certificate"),
        ("rogue-ca", "unknown_ca"),
        ("expired", "expired"),
        ("not-yet-valid", "not_yet_valid"),
        ("server-eku", "bad_eku"),
        ("spoofed-client-id", "identity_mismatch"),
        ("dev-on-prod", "env_mismatch"),
    ],
)
def test_refused_connections_are_classified_counted_and_named(
    fleet: Workspace, running: BrokerThread, tmp_path: Path, case: str, reason: str
) -> None:
    creds: Credentials | None
    client_id = None
    if case == "no-certificate":
        creds = None
    elif case == "rogue-ca":
        creds = _rogue_credentials(tmp_path)
    elif case == "expired":
        creds = _creds(fleet, "old-00001")
    elif case == "not-yet-valid":
        creds = _creds(fleet, "future-00001")
    elif case == "server-eku":
        creds = issue_with_eku(fleet, tmp_path / "eku", "dev-00001", SERVER_AUTH_ONLY)
    elif case == "spoofed-client-id":
        creds, client_id = _creds(fleet, "dev-00002"), "dev-00001"
    else:
        creds = _creds(fleet, "lab-00001")
    result = mosquitto_pub(
        running.port, fleet.paths.root_cert, creds, "devices/dev-00001/x", "x", client_id=client_id
    )
    assert result.returncode != 0
    event = _rejection(running, reason)
    assert running.outcome_count(reason) == 1
    assert running.outcome_count("ok") == 0
    if creds is not None:
        assert event["device"] == creds.device_id and event["serial"], event
        assert str(event["peer"]).startswith("127.0.0.1:")


def test_openssl_s_client_sees_a_verified_broker_and_the_broker_sees_a_rogue(
    fleet: Workspace, running: BrokerThread, tmp_path: Path
) -> None:
    good = _creds(fleet, "dev-00003")
    result = openssl(
        "s_client", "-connect", f"127.0.0.1:{running.port}", "-servername", "localhost",
        "-CAfile", str(fleet.paths.root_cert), "-cert", str(good.cert), "-key", str(good.key),
        "-verify_return_error", "-brief", check=False,
    )  # fmt: skip
    assert "Verification: OK" in result.stderr, result.stderr
    rogue = _rogue_credentials(tmp_path)
    openssl(
        "s_client", "-connect", f"127.0.0.1:{running.port}", "-CAfile", str(fleet.paths.root_cert),
        "-cert", str(rogue.cert), "-key", str(rogue.key), "-brief", check=False,
    )  # fmt: skip
    assert _rejection(running, "unknown_ca")["device"] == "dev-00001"


# -- revocation and expiry ----------------------------------------------------------------------


def test_revocation_cuts_off_exactly_that_device_again_and_again(
    fleet: Workspace, running: BrokerThread
) -> None:
    ca = fleet.paths.root_cert
    devices = {
        d: paho_device(running.port, ca, _creds(fleet, d))
        for d in ("dev-00001", "dev-00002", "dev-00003", "dev-00004")
    }
    try:
        for device in devices.values():
            assert device.connected.wait(10), device.reason
        bystander = devices["dev-00004"]
        bystander.client.subscribe("devices/dev-00004/#", qos=1)
        assert bystander.subscribed.wait(10)
        for round_number, victim in enumerate(("dev-00001", "dev-00002", "dev-00003"), start=1):
            started = time.monotonic()
            revoke_device(fleet, victim)
            assert devices[victim].disconnected.wait(5), (
                f"{victim} still connected after revocation"
            )
            latency = time.monotonic() - started
            assert latency < 5
            event = running.wait_for_event(_closed_session_of(victim))
            assert event["reason"] == "revoked"
            refused = mosquitto_pub(
                running.port, ca, _creds(fleet, victim), f"devices/{victim}/t", "x"
            )
            assert refused.returncode != 0
            assert running.outcome_count("revoked") == round_number
            # the bystander is still connected and its messages still flow
            assert not bystander.disconnected.is_set()
            bystander.message_arrived.clear()
            bystander.client.publish("devices/dev-00004/telemetry", f"round {round_number}", qos=1)
            assert bystander.message_arrived.wait(10)
    finally:
        for device in devices.values():
            device.stop()


def test_revocations_survive_a_broker_restart(fleet: Workspace) -> None:
    revoke_device(fleet, "dev-00002")
    broker = BrokerThread(settings_for_tests(fleet))
    try:
        refused = mosquitto_pub(
            broker.port,
            fleet.paths.root_cert,
            _creds(fleet, "dev-00002"),
            "devices/dev-00002/t",
            "x",
        )
        assert refused.returncode != 0
        assert _rejection(broker, "revoked")["device"] == "dev-00002"
        allowed = mosquitto_pub(
            broker.port,
            fleet.paths.root_cert,
            _creds(fleet, "dev-00001"),
            "devices/dev-00001/t",
            "x",
        )
        assert allowed.returncode == 0, allowed.stderr
    finally:
        broker.stop()


def test_a_session_ends_when_its_certificate_expires(workspace: Workspace) -> None:
    short = _provision(workspace, 1, "brief", valid_for=dt.timedelta(seconds=6))[0]
    broker = BrokerThread(settings_for_tests(workspace))
    device = paho_device(broker.port, workspace.paths.root_cert, _creds(workspace, short))
    try:
        assert device.connected.wait(10), device.reason
        assert device.disconnected.wait(15), "the session outlived its certificate"
        event = broker.wait_for_event(lambda e: e.get("event") == "session_closed")
        assert event["reason"] == "expired" and event["device"] == short
        refused = mosquitto_pub(
            broker.port, workspace.paths.root_cert, _creds(workspace, short), "devices/x/t", "x"
        )
        assert refused.returncode != 0
        assert _rejection(broker, "expired")["device"] == short
    finally:
        device.stop()
        broker.stop()


@pytest.mark.parametrize("policy", list(RevocationPolicy))
def test_a_stale_crl_follows_the_revocation_policy(
    tmp_path: Path, policy: RevocationPolicy
) -> None:
    init_workspace(tmp_path / "ws", config=FleetConfig(crl_valid_for=dt.timedelta(seconds=2)))
    ws = Workspace.open(tmp_path / "ws")
    _provision(ws, 2, "dev")
    revoke_device(ws, "dev-00002")  # publishes a CRL that goes stale 2 s later
    broker = BrokerThread(settings_for_tests(ws, revocation_policy=policy))
    try:
        broker.wait_for_event(lambda e: e.get("event") == "crl_stale")
        assert broker.broker.metrics.registry.get_sample_value("mtls_crl_stale") == 1
        good = mosquitto_pub(
            broker.port, ws.paths.root_cert, _creds(ws, "dev-00001"), "devices/dev-00001/t", "x"
        )
        revoked = mosquitto_pub(
            broker.port, ws.paths.root_cert, _creds(ws, "dev-00002"), "devices/dev-00002/t", "x"
        )
        assert revoked.returncode != 0, "a known revocation holds under either policy"
        if policy is RevocationPolicy.FAIL_CLOSED:
            assert good.returncode != 0
            assert broker.outcome_count("crl_stale") >= 1
        else:
            assert good.returncode == 0, good.stderr
            assert (
                broker.broker.metrics.registry.get_sample_value("mtls_stale_crl_admissions_total")
                == 1
            )
            assert broker.outcome_count("revoked") == 1
        # refused in the handshake, with an alert the device can name, under either policy
        assert _handshake_alert(broker.port, ws, "dev-00002") == "certificate_revoked"
    finally:
        broker.stop()


def _handshake_alert(port: int, ws: Workspace, device_id: str) -> str | None:
    """The TLS alert the broker refuses ``device_id`` with (None: it was not refused)."""
    context = tls_context(ws.paths.root_cert, _creds(ws, device_id))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd")
            tls.recv(10)
    except ssl.SSLError as exc:
        return alert_name(exc)
    return None


# -- bad input it survives ----------------------------------------------------------------------


def test_garbage_idle_sockets_and_bad_mqtt_are_closed_counted_and_harmless(
    fleet: Workspace, running: BrokerThread
) -> None:
    address = ("127.0.0.1", running.port)
    garbage = socket.create_connection(address)
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(512))
    idle = [socket.create_connection(address) for _ in range(100)]

    # a valid device connects while 100 idle sockets are open
    ok = mosquitto_pub(
        running.port, fleet.paths.root_cert, _creds(fleet, "dev-00001"), "devices/dev-00001/t", "x"
    )
    assert ok.returncode == 0, ok.stderr

    context = tls_context(fleet.paths.root_cert, _creds(fleet, "dev-00002"))
    with (
        socket.create_connection(address) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"\x30\x05\x00\x01ab")  # a PUBLISH before CONNECT
        assert tls.recv(100) == b""
    with (
        socket.create_connection(address) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"\x10\xff\xff\xff\x7f")  # CONNECT announcing 256 MB
        assert tls.recv(100) == b""

    for sock in idle:  # closed by the broker after the handshake timeout
        sock.settimeout(10)
        assert sock.recv(1) == b""
        sock.close()
    garbage.close()
    assert running.outcome_count("handshake_timeout") == 100
    assert running.outcome_count("protocol_error") >= 3
    event = running.wait_for_event(
        lambda e: "256" in str(e.get("detail", "")) or "exceeds" in str(e.get("detail", ""))
    )
    assert event["device"] == "dev-00002"
    assert running.outcome_count("ok") == 1


# -- topic rights -------------------------------------------------------------------------------


def test_tier_rights_and_wildcards_that_must_not_leak(
    fleet: Workspace, running: BrokerThread
) -> None:
    ca = fleet.paths.root_cert
    bronze = paho_device(running.port, ca, _creds(fleet, "dev-00001"))
    gold = paho_device(running.port, ca, _creds(fleet, "gw-00001"))
    try:
        assert bronze.connected.wait(10) and gold.connected.wait(10)
        bronze.client.subscribe(
            [("devices/#", 1), ("devices/dev-00001/#", 1), ("fleet/broadcast/#", 1)]
        )
        assert bronze.subscribed.wait(10)
        assert bronze.granted == [128, 1, 1], (
            "devices/# is refused, own topics and broadcast granted"
        )
        # another device's telemetry never reaches the bronze device
        mosquitto_pub(
            running.port, ca, _creds(fleet, "dev-00002"), "devices/dev-00002/telemetry", "secret"
        )
        # bronze may not broadcast; gold may
        bronze.client.publish("fleet/broadcast/ota", "from bronze", qos=1)
        gold.client.publish("fleet/broadcast/ota", "from gold", qos=1)
        assert bronze.message_arrived.wait(10)
        running.wait_for_event(
            lambda e: e.get("event") == "acl_denied" and e.get("device") == "dev-00001"
        )
        assert bronze.messages == [("fleet/broadcast/ota", b"from gold")]
    finally:
        bronze.stop()
        gold.stop()


def test_the_newer_session_takes_over(fleet: Workspace, running: BrokerThread) -> None:
    ca = fleet.paths.root_cert
    first = paho_device(running.port, ca, _creds(fleet, "dev-00003"))
    assert first.connected.wait(10)
    second = paho_device(running.port, ca, _creds(fleet, "dev-00003"))
    try:
        assert second.connected.wait(10)
        assert first.disconnected.wait(10)
        event = running.wait_for_event(lambda e: e.get("event") == "session_closed")
        assert event["reason"] == "takeover" and event["device"] == "dev-00003"
        assert not second.disconnected.is_set()
    finally:
        first.stop()
        second.stop()


def test_ended_and_refused_sessions_are_not_kept(fleet: Workspace, running: BrokerThread) -> None:
    """Clean sessions end with their connection; refused ones never start."""
    ca = fleet.paths.root_cert
    for index, device_id in enumerate(("dev-00001", "dev-00002", "dev-00004")):
        refused = paho_device(running.port, ca, _creds(fleet, device_id), client_id=f"x-{index}")
        assert refused.disconnected.wait(10) and not refused.connected.is_set()
        refused.stop()
        leaving = paho_device(running.port, ca, _creds(fleet, device_id))
        assert leaving.connected.wait(10)
        leaving.stop()  # a clean DISCONNECT
        assert leaving.disconnected.wait(10)
    engine = running.broker.engine
    kept: dict[str, Any] = {}
    for _ in range(100):  # the broker finishes each teardown right after the socket closes
        kept = dict(engine.sessions)
        if not kept:
            break
        time.sleep(0.02)
    assert kept == {}


# -- interop and CLI ----------------------------------------------------------------------------


def test_the_emitted_mosquitto_config_runs_a_real_mosquitto(
    fleet: Workspace, tmp_path: Path
) -> None:
    revoke_device(fleet, "dev-00004")
    conf = tmp_path / "mosquitto.conf"
    with running_mosquitto(fleet.paths.root, conf) as port:
        text = conf.read_text()
        for setting in (
            "require_certificate true",
            "use_identity_as_username true",
            f"crlfile {fleet.paths.crl.resolve()}",
        ):
            assert setting in text
        ca = fleet.paths.root_cert
        good = mosquitto_pub(port, ca, _creds(fleet, "dev-00001"), "devices/dev-00001/t", "hi")
        assert good.returncode == 0, good.stderr
        assert mosquitto_pub(port, ca, None, "devices/dev-00001/t", "hi").returncode != 0
        assert (
            mosquitto_pub(
                port, ca, _creds(fleet, "dev-00004"), "devices/dev-00004/t", "hi"
            ).returncode
            != 0
        )


def test_fleet_broker_announces_and_stops_on_sigterm(fleet: Workspace) -> None:
    process = subprocess.Popen(
        fleet_command("broker", "--dir", fleet.paths.root, "--port", "0", "--metrics-port", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on mqtts://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        metrics_line = process.stdout.readline()
        metrics_url = metrics_line.split(" on ", 1)[1].strip()
        ok = mosquitto_pub(
            port, fleet.paths.root_cert, _creds(fleet, "dev-00001"), "devices/dev-00001/t", "x"
        )
        assert ok.returncode == 0, ok.stderr
        with urllib.request.urlopen(metrics_url, timeout=30) as response:
            body = response.read().decode()
        assert 'mtls_connection_attempts_total{outcome="ok"} 1.0' in body
        assert "mtls_handshake_duration_seconds_bucket" in body
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    assert process.returncode == 0


def test_the_launcher_reads_the_port_and_names_a_broker_that_did_not_start(
    fleet: Workspace, tmp_path: Path
) -> None:
    with launched_broker(fleet.paths.root, metrics=True) as broker:
        ok = mosquitto_pub(
            broker.port,
            fleet.paths.root_cert,
            _creds(fleet, "dev-00001"),
            "devices/dev-00001/t",
            "x",
        )
        assert ok.returncode == 0, ok.stderr
        assert broker.metrics_url is not None and broker.metrics_url.endswith("/metrics")
    assert broker.process.returncode == 0  # SIGTERM: a clean stop
    with pytest.raises(BrokerError, match="the broker did not start"), launched_broker(tmp_path):
        pass  # not a workspace: it says why on stderr and prints no 'listening on'


@given(st.one_of(st.text(max_size=80), st.text(max_size=40).map("listening on mqtts://".__add__)))
def test_only_a_listening_line_gives_a_port(line: str) -> None:
    if re.fullmatch(r"listening on mqtts://.*:[0-9]+", line.strip(), re.DOTALL):
        assert listening_port(line) == int(line.strip().rsplit(":", 1)[1])
        return
    with pytest.raises(BrokerError):
        listening_port(line)
    assert listening_port("listening on mqtts://127.0.0.1:8883\n") == 8883

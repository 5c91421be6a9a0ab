"""Simulated devices (paho on asyncio) against the embedded broker: outcomes seen client-side."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import BrokerSettings, FleetBroker
from device import (
    ConnectAttempt,
    ConnectOutcome,
    Device,
    DeviceSettings,
    PahoDriver,
    UntrustedReason,
    device_tls,
    device_tls_context,
)
from fleet import (
    CertificateError,
    FleetConfig,
    ProvisionSpec,
    Workspace,
    init_workspace,
    issue_broker_certificate,
    provision_devices,
    revoke_device,
)

T = TypeVar("T")


@pytest.fixture
def fleet(workspace: Workspace) -> Workspace:
    provision_devices(workspace, ProvisionSpec(count=3, prefix="dev"))
    return workspace


def _settings(ws: Workspace, device_id: str, port: int, **overrides: object) -> DeviceSettings:
    paths = ws.paths
    options: dict[str, Any] = {"port": port, "publish_every": 0.2, "backoff_cap": 0.5}
    options.update(overrides)
    return DeviceSettings(
        device_id,
        paths.device_cert(device_id),
        paths.device_key(device_id),
        paths.root_cert,
        **options,
    )


async def _broker(ws: Workspace) -> FleetBroker:
    broker = FleetBroker(
        BrokerSettings(workspace=ws.paths.root, port=0, metrics_port=None, event_log=False)
    )
    await broker.start()
    return broker


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def test_connect_publish_and_phase_timings(fleet: Workspace) -> None:
    async def scenario() -> None:
        broker = await _broker(fleet)
        try:
            device = Device(_settings(fleet, "dev-00001", broker.port or 0), PahoDriver())
            attempt = await device.connect()
            assert attempt.outcome is ConnectOutcome.CONNECTED, attempt
            assert (
                attempt.tcp_seconds is not None
                and attempt.tls_seconds is not None
                and attempt.mqtt_seconds is not None
            )
            assert attempt.tls_seconds > 0
            device.publish_telemetry()
            device.publish_telemetry()
            for _ in range(200):
                if device.stats.acknowledged == 2:
                    break
                await asyncio.sleep(0.01)
            assert device.stats.acknowledged == 2, "QoS 1 publications are acknowledged"
            await device.close()
        finally:
            await broker.stop()

    run(scenario())


def test_revoked_device_is_cut_off_and_then_refused_with_the_alert(fleet: Workspace) -> None:
    async def scenario() -> None:
        broker = await _broker(fleet)
        try:
            driver = PahoDriver()
            victim = Device(_settings(fleet, "dev-00002", broker.port or 0), driver)
            other = Device(_settings(fleet, "dev-00003", broker.port or 0), driver)
            assert (await victim.connect()).outcome is ConnectOutcome.CONNECTED
            assert (await other.connect()).outcome is ConnectOutcome.CONNECTED
            await asyncio.to_thread(revoke_device, fleet, "dev-00002")
            await asyncio.wait_for(victim.wait_disconnected(), 5)
            # MQTT 3.1.1 gives the broker no word for why it cut: the device says it cannot tell
            assert victim.stats.disconnects == ["connection_lost"]
            again = await victim.connect()
            assert again.outcome is ConnectOutcome.REJECTED_BY_BROKER
            assert again.detail == "certificate_revoked"
            assert other.connected
            await other.close()
        finally:
            await broker.stop()

    run(scenario())


def test_the_device_refuses_a_rogue_broker_and_a_wrong_hostname(
    fleet: Workspace, tmp_path: Path
) -> None:
    rogue = init_workspace(tmp_path / "rogue", config=FleetConfig())
    # the broker presents a certificate from a CA the devices do not trust
    shutil.copy(rogue.paths.server_cert, fleet.paths.server_cert)
    shutil.copy(rogue.paths.server_key, fleet.paths.server_key)

    async def scenario(server_name: str | None) -> tuple[ConnectOutcome, str | None]:
        broker = await _broker(fleet)
        try:
            attempt = await Device(
                _settings(fleet, "dev-00001", broker.port or 0, server_name=server_name),
                PahoDriver(),
            ).connect()
            return attempt.outcome, attempt.detail
        finally:
            await broker.stop()

    outcome, detail = run(scenario("localhost"))
    assert outcome is ConnectOutcome.BROKER_UNTRUSTED
    assert detail == UntrustedReason.UNKNOWN_ISSUER

    issue_broker_certificate(fleet.paths, fleet.ca)  # a fleet certificate again, for localhost only
    outcome, detail = run(scenario("broker.example"))
    assert outcome is ConnectOutcome.BROKER_UNTRUSTED
    assert detail == UntrustedReason.HOSTNAME_MISMATCH


def test_expired_broker_certificate_is_refused(fleet: Workspace) -> None:
    now = dt.datetime.now(dt.UTC)
    issue_broker_certificate(fleet.paths, fleet.ca, now=now - dt.timedelta(days=400))

    async def scenario() -> tuple[ConnectOutcome, str | None]:
        broker = await _broker(fleet)
        try:
            attempt = await Device(
                _settings(fleet, "dev-00001", broker.port or 0), PahoDriver()
            ).connect()
            return attempt.outcome, attempt.detail
        finally:
            await broker.stop()

    outcome, detail = run(scenario())
    assert (outcome, detail) == (
        ConnectOutcome.BROKER_UNTRUSTED,
        UntrustedReason.CERTIFICATE_EXPIRED,
    )


def test_a_target_that_is_not_listening_is_a_network_error(fleet: Workspace) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused

        async def attempt_once() -> ConnectAttempt:
            return await Device(_settings(fleet, "dev-00001", port), PahoDriver()).connect()

        attempt = run(attempt_once())
    assert attempt.outcome is ConnectOutcome.NETWORK_ERROR


@pytest.mark.parametrize("load", [device_tls_context, device_tls])
def test_a_key_that_does_not_match_names_the_device(fleet: Workspace, load: Any) -> None:
    """Both ways a device loads its credentials (Python's ssl for paho's own TLS, pyOpenSSL
    for simulated devices) refuse the same things with the same words and codes."""
    paths = fleet.paths
    with pytest.raises(
        CertificateError,
        match=r"device 'dev-00001': unusable certificate or key \(the key does not match",
    ) as mismatch:
        load(
            paths.root_cert,
            paths.device_cert("dev-00001"),
            paths.device_key("dev-00002"),
            device_id="dev-00001",
        )
    assert mismatch.value.code == "key_mismatch"
    with pytest.raises(CertificateError, match=r"device 'dev-00001': missing .*nope\.pem") as gone:
        load(
            paths.root_cert,
            paths.device_cert("dev-00001"),
            paths.root / "nope.pem",
            device_id="dev-00001",
        )
    assert gone.value.code == "missing_file"
    with pytest.raises(CertificateError, match=r"cannot load trust anchor") as anchor:
        load(
            paths.root / "no-root.pem",
            paths.device_cert("dev-00001"),
            paths.device_key("dev-00001"),
            device_id="dev-00001",
        )
    assert anchor.value.code == "bad_trust_anchor"


def test_devices_of_one_issuing_ca_share_one_context_and_keep_their_own_identity(
    fleet: Workspace,
) -> None:
    paths = fleet.paths
    first, second = (
        device_tls(paths.root_cert, paths.device_cert(d), paths.device_key(d), device_id=d)
        for d in ("dev-00001", "dev-00002")
    )
    assert first.context is second.context  # the trust store and chain, parsed once
    assert first.certificate is not None and second.certificate is not None
    assert first.certificate.get_serial_number() != second.certificate.get_serial_number()
    bare = device_tls(
        paths.root_cert,
        paths.device_cert("dev-00001"),
        paths.device_key("dev-00001"),
        device_id="dev-00001",
        present_certificate=False,
    )
    assert (bare.certificate, bare.key) == (None, None)
    assert bare.context is not first.context  # no issuing chain to send


def test_a_renewed_certificate_is_used_from_the_next_handshake_on(
    fleet: Workspace, tmp_path: Path
) -> None:
    from cryptography import x509

    from fleet import DeviceIdentity, KeyType, generate_private_key
    from fleet.kernel.keys import private_key_pem

    now = dt.datetime.now(dt.UTC)
    key = generate_private_key(KeyType.EC_P256)
    identity = DeviceIdentity(
        device_id="dev-00001",
        tier="bronze",
        env="prod",
        trust_domain=fleet.config.trust_domain,
    )
    renewed = fleet.ca.issue_device(
        identity, key.public_key(), not_before=now, not_after=now + dt.timedelta(days=1)
    )
    (tmp_path / "cert.pem").write_bytes(fleet.ca.chain_pem(renewed))
    (tmp_path / "key.pem").write_bytes(private_key_pem(key))

    async def scenario() -> tuple[int, int, bool]:
        broker = await _broker(fleet)
        try:
            device = Device(_settings(fleet, "dev-00001", broker.port or 0), PahoDriver())
            assert (await device.connect()).outcome is ConnectOutcome.CONNECTED
            first = broker.session_serials()["dev-00001"]
            device.swap_certificate(tmp_path / "cert.pem", tmp_path / "key.pem")
            still_connected = device.connected  # the live session is kept
            await device.close()
            assert (await device.connect()).outcome is ConnectOutcome.CONNECTED
            second = broker.session_serials()["dev-00001"]
            await device.close()
            assert first is not None and second is not None
            return first, second, still_connected
        finally:
            await broker.stop()

    first, second, still_connected = run(scenario())
    assert still_connected
    original = x509.load_pem_x509_certificates(fleet.paths.device_cert("dev-00001").read_bytes())[0]
    assert first == original.serial_number
    assert second == renewed.serial_number != first


def test_a_pinned_device_refuses_a_valid_broker_certificate_for_another_key(
    fleet: Workspace,
) -> None:
    from fleet.scenario.credentials import broker_pin

    pinned = broker_pin(fleet.paths.server_cert)

    async def attempts() -> list[ConnectAttempt]:
        broker = await _broker(fleet)
        port = broker.port or 0
        try:
            driver = PahoDriver()
            plain = Device(_settings(fleet, "dev-00001", port), driver)
            right = Device(_settings(fleet, "dev-00002", port, pins=(pinned,)), driver)
            wrong = Device(
                _settings(fleet, "dev-00003", port, pins=("sha256/" + "A" * 43 + "=",)), driver
            )
            results = [await d.connect() for d in (plain, right, wrong)]
            await plain.close()
            await right.close()
            return results
        finally:
            await broker.stop()

    plain, right, wrong = run(attempts())
    assert plain.outcome is ConnectOutcome.CONNECTED
    assert right.outcome is ConnectOutcome.CONNECTED
    assert (wrong.outcome, wrong.detail) == (
        ConnectOutcome.BROKER_UNTRUSTED,
        UntrustedReason.PIN_MISMATCH,
    )
    assert wrong.message == f"the broker's key {pinned} is not pinned"

    issue_broker_certificate(fleet.paths, fleet.ca)  # the right CA, a new key: the pin fails
    plain, right, _ = run(attempts())
    assert plain.outcome is ConnectOutcome.CONNECTED
    assert (right.outcome, right.detail) == (
        ConnectOutcome.BROKER_UNTRUSTED,
        UntrustedReason.PIN_MISMATCH,
    )


def test_a_device_without_a_certificate_is_refused_with_certificate_required(
    fleet: Workspace,
) -> None:
    async def attempt() -> tuple[ConnectAttempt, dict[str, float]]:
        broker = await _broker(fleet)
        try:
            device = Device(
                _settings(fleet, "dev-00001", broker.port or 0, present_certificate=False),
                PahoDriver(),
            )
            result = await device.connect()
            counted = {
                s.labels["outcome"]: s.value
                for metric in broker.metrics.connections.collect()
                for s in metric.samples
                if s.name.endswith("_total")
            }
            return result, counted
        finally:
            await broker.stop()

    result, counted = run(attempt())
    assert (result.outcome, result.detail) == (
        ConnectOutcome.REJECTED_BY_BROKER,
        "certificate_required",
    )
    assert counted.get("no_certificate") == 1


def test_a_session_lost_right_after_its_connack_is_a_drop_not_a_live_session(
    fleet: Workspace,
) -> None:
    """A broker that takes the session over (or dies) just after the CONNACK: the device once
    kept 'connected' with a dead socket and published in a busy loop (found on Mosquitto)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(fleet.paths.server_cert, fleet.paths.server_key)

    async def scenario() -> tuple[ConnectAttempt, bool, list[str], int]:
        async def answer_then_close(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await reader.read(1024)  # the CONNECT
            writer.write(bytes([0x20, 2, 0, 0]))  # CONNACK accepted, and gone at once
            writer.close()

        server = await asyncio.start_server(answer_then_close, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        try:
            device = Device(
                _settings(fleet, "dev-00001", port, reconnect=False, publish_every=0.05),
                PahoDriver(),
            )
            stop = asyncio.Event()
            running = asyncio.create_task(device.run(stop))
            await asyncio.wait_for(running, 5)  # no reconnect: it ends once the session is lost
            attempt = device.stats.attempts[0]
            return attempt, device.connected, device.stats.disconnects, device.stats.sent
        finally:
            server.close()
            await server.wait_closed()

    attempt, connected, disconnects, sent = run(scenario())
    assert attempt.outcome is ConnectOutcome.CONNECTED  # it did connect ...
    assert not connected and disconnects == ["connection_lost"]  # ... and knows it was cut
    assert sent <= 1


@pytest.mark.parametrize(
    ("version", "tickets", "outcome", "reason"),
    [
        ("TLSv1_2", 2, ConnectOutcome.CONNACK_REFUSED, "closed_at_connect"),
        ("TLSv1_3", 2, ConnectOutcome.CONNACK_REFUSED, "closed_at_connect"),
        # no tickets: nothing says the broker accepted the certificate, so it cannot be told
        # from a TLS refusal without an alert
        ("TLSv1_3", 0, ConnectOutcome.REJECTED_BY_BROKER, "connection_closed"),
    ],
)
def test_a_broker_that_closes_on_an_mqtt5_connect_refused_it_at_connect(
    fleet: Workspace, version: str, tickets: int, outcome: ConnectOutcome, reason: str
) -> None:
    """RabbitMQ before 3.13 accepts the TLS handshake (client certificate verified), cannot
    parse an MQTT 5 CONNECT and closes without a CONNACK: a refusal at CONNECT, not at TLS."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(fleet.paths.server_cert, fleet.paths.server_key)
    context.load_verify_locations(fleet.paths.root_cert)
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = context.maximum_version = ssl.TLSVersion[version]
    context.num_tickets = tickets
    connects: list[bytes] = []

    async def scenario() -> ConnectAttempt:
        async def close_on_connect(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            connects.append(await reader.read(1024))
            writer.close()  # "cannot parse frame": no CONNACK

        server = await asyncio.start_server(close_on_connect, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        try:
            device = Device(
                _settings(fleet, "dev-00001", port, reconnect=False, mqtt_version=5), PahoDriver()
            )
            await asyncio.wait_for(device.run(asyncio.Event()), 5)
            return device.stats.attempts[0]
        finally:
            server.close()
            await server.wait_closed()

    attempt = run(scenario())
    assert (attempt.outcome, attempt.detail) == (outcome, reason)
    assert connects and connects[0][0] == 0x10 and connects[0][8] == 5  # an MQTT 5 CONNECT


@given(st.binary(min_size=32, max_size=32))
def test_a_pin_is_a_sha256_digest_in_base64(digest: bytes) -> None:
    import base64

    from fleet.kernel.tls import parse_pin

    encoded = base64.b64encode(digest).decode()
    assert parse_pin(f"sha256/{encoded}") == f"sha256/{encoded}"
    assert parse_pin(f" sha256//{encoded} ") == f"sha256/{encoded}"  # curl's spelling too


@given(st.text(max_size=80))
def test_anything_else_is_refused_as_a_pin(text: str) -> None:
    from fleet.kernel.tls import parse_pin

    try:
        pin = parse_pin(text)
    except ValueError as exc:
        assert "invalid pin" in str(exc)
    else:  # only a 32-byte digest in base64 gets through
        assert pin.startswith("sha256/") and len(pin) == len("sha256/") + 44

"""Enrollment by claim and renewal over MQTT, end to end on real sockets.

The embedded broker, the control plane's MQTT service (its admin certificate, its own paho
thread) and simulated devices all run for real; the registry is read back afterwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509

from broker import BrokerSettings, FleetBroker, launched_broker
from device import ConnectOutcome, Device, DeviceSettings, PahoDriver
from device.enrollment import ClaimBundle, EnrollmentResult, enroll
from device.requests import prepare_enrollment
from fleet import ProvisionSpec, Workspace, provision_devices
from fleet.controlplane.mqtt_service import CertificateService
from fleet.kernel.identity_files import recover_identity
from fleet.kernel.mqtt_api import PROVISION, decode_reply, reply_topic, request_topic
from fleet.store.certificate_requests import CertificateRequests
from fleet.store.claims import ClaimRules, create_claim, revoke_claim

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@asynccontextmanager
async def control_plane(ws: Workspace) -> AsyncIterator[tuple[FleetBroker, CertificateRequests]]:
    """Our broker plus the control plane answering on it (admin certificate, paho thread)."""
    broker = FleetBroker(
        BrokerSettings(workspace=ws.paths.root, port=0, metrics_port=None, event_log=False)
    )
    await broker.start()
    requests = CertificateRequests(ws)
    service = CertificateService(ws, requests, host="127.0.0.1", port=broker.port or 0)
    try:
        await asyncio.to_thread(service.start)
        yield broker, requests
    finally:
        await asyncio.to_thread(service.stop)
        await broker.stop()


def _count(requests: CertificateRequests, counter: str, outcome: str) -> float:
    metric = requests.enrollments if counter == "enroll" else requests.renewals
    return float(metric.labels(outcome)._value.get())


def test_devices_enroll_through_a_claim_and_its_rules_hold(
    workspace: Workspace, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    create_claim(workspace, ClaimRules("batch-7", max_uses=4, allow_ids="sensor-*", tier="silver"))
    claim = ClaimBundle(workspace.paths.claim_dir("batch-7"))
    assert (claim.key.stat().st_mode & 0o777) == 0o600

    async def scenario() -> dict[str, EnrollmentResult]:
        async with control_plane(workspace) as (broker, requests):
            port = broker.port or 0
            context = claim.context()

            async def one(device_id: str, serial: str = "") -> EnrollmentResult:
                return await enroll(
                    device_id, claim, store, port=port, context=context, hardware_serial=serial
                )

            enrolled = await asyncio.gather(*(one(f"sensor-{n}", f"HW-{n}") for n in range(3)))
            results = {r.device_id: r for r in enrolled}
            results["taken"] = await one("sensor-0")
            results["not-allowed"] = await one("camera-1")
            results["sensor-3"] = await one("sensor-3")  # the fourth and last use
            results["exhausted"] = await one("sensor-4")
            # The enrolled devices connect with their own certificates and keys.
            device = Device(
                DeviceSettings(
                    "sensor-1",
                    store / "sensor-1" / "cert.pem",
                    store / "sensor-1" / "key.pem",
                    workspace.paths.root_cert,
                    port=port,
                ),
                PahoDriver(),
            )
            assert (await device.connect()).outcome is ConnectOutcome.CONNECTED
            await device.close()
            assert _count(requests, "enroll", "issued") == 4
            assert _count(requests, "enroll", "id_taken") == 1
            return results

    results = run(scenario())
    for n in range(4):
        assert results[f"sensor-{n}"].enrolled, results[f"sensor-{n}"]
        key = store / f"sensor-{n}" / "key.pem"
        assert (key.stat().st_mode & 0o777) == 0o600
    assert (results["taken"].status, results["taken"].reason) == ("refused", "id_taken")
    assert results["not-allowed"].reason == "id_not_allowed"
    assert "sensor-*" in results["not-allowed"].detail
    assert results["exhausted"].reason == "claim_exhausted"
    # The registry: the devices, their tier from the claim, how they joined; a key never left.
    record = workspace.registry.get("sensor-2")
    assert (record.tier, record.key_source) == ("silver", "csr")
    enrollment = workspace.registry.enrollment("sensor-2")
    assert enrollment is not None
    assert (enrollment.claim, enrollment.hardware_serial) == ("batch-7", "HW-2")
    assert not workspace.paths.device_key("sensor-2").exists()
    assert workspace.registry.claim("batch-7").uses == 4
    cert = x509.load_pem_x509_certificate((store / "sensor-2" / "cert.pem").read_bytes())
    assert cert.serial_number == record.serial


def test_a_claim_reaches_nothing_but_enrollment_and_a_revoked_claim_is_refused(
    workspace: Workspace, tmp_path: Path
) -> None:
    create_claim(workspace, ClaimRules("batch-8"))
    claim = ClaimBundle(workspace.paths.claim_dir("batch-8"))

    async def scenario() -> tuple[list[str], bool, EnrollmentResult, EnrollmentResult]:
        async with control_plane(workspace) as (broker, _):
            port = broker.port or 0
            prepared = prepare_enrollment("sensor-1", claim.cert, claim.key)
            settings = DeviceSettings(
                "sensor-1",
                claim.cert,
                claim.key,
                claim.trust_anchor,
                port=port,
                client_id=f"enroll:{prepared.request_id}",
                subscribe_commands=False,
                reconnect=False,
            )
            device = Device(settings, PahoDriver())
            assert (await device.connect()).outcome is ConnectOutcome.CONNECTED
            own_reply = await device.subscribe(reply_topic(PROVISION, prepared.request_id))
            others = await device.subscribe("$fleet/provision/+/reply")
            telemetry_sub = await device.subscribe("devices/sensor-1/#")
            device.publish("devices/sensor-1/telemetry", b"{}", qos=1)
            await broker.wait_for_event(
                lambda e: e["event"] == "acl_denied" and "telemetry" in e.get("detail", ""), 5
            )
            denied = [e.get("detail", "") for e in broker.events if e["event"] == "acl_denied"]
            await device.close()
            # A client id that is not enroll:<request id> is refused at CONNECT.
            spoof = Device(
                DeviceSettings(
                    "sensor-1", claim.cert, claim.key, claim.trust_anchor, port=port,
                    client_id="sensor-1", subscribe_commands=False, reconnect=False,
                ),
                PahoDriver(),
            )  # fmt: skip
            spoofed = await spoof.connect()
            await spoof.close()
            assert spoofed.outcome is ConnectOutcome.CONNACK_REFUSED
            good = await enroll("sensor-1", claim, tmp_path, port=port)
            revoke_claim(workspace, "batch-8")
            await broker.wait_for_event(lambda e: e["event"] == "crl_installed", 5)
            after = await enroll("sensor-2", claim, tmp_path, port=port)
            return denied, own_reply and not others and not telemetry_sub, good, after

    denied, subscriptions_as_expected, good, after = run(scenario())
    assert subscriptions_as_expected
    assert any("devices/sensor-1/telemetry" in d for d in denied)
    assert good.enrolled
    # The claim's certificate is on the CRL: refused in the TLS handshake, before any MQTT.
    assert (after.status, after.reason, after.detail) == (
        "failed",
        "rejected_by_broker",
        "certificate_revoked",
    )
    assert workspace.registry.get("sensor-1").status == "active"  # enrolled devices unaffected


def test_bad_requests_are_refused_with_the_field_named(workspace: Workspace) -> None:
    create_claim(workspace, ClaimRules("batch-9"))
    claim = ClaimBundle(workspace.paths.claim_dir("batch-9"))
    requests = CertificateRequests(workspace)
    not_json = requests.enroll("abcdefgh12", b"{nope")
    assert (not_json.status, not_json.reason) == ("refused", "bad_request")
    missing = requests.enroll("abcdefgh12", b'{"device_id": "x"}')
    assert "'csr'" in missing.message
    prepared = prepare_enrollment("sensor-1", claim.cert, claim.key, request_id="abcdefgh13")
    replayed_elsewhere = requests.enroll("abcdefgh14", prepared.payload)
    assert replayed_elsewhere.reason == "bad_signature"  # the proof binds the request id
    issued = requests.enroll("abcdefgh13", prepared.payload)
    again = requests.enroll("abcdefgh13", prepared.payload)  # QoS 1 redelivery: same answer
    assert issued.issued and again == issued
    assert workspace.registry.claim("batch-9").uses == 1


def test_devices_renew_over_mqtt_before_expiry_without_losing_a_message(
    workspace: Workspace,
) -> None:
    provision_devices(
        workspace, ProvisionSpec(count=3, prefix="short", valid_for=dt.timedelta(seconds=6))
    )
    paths = workspace.paths

    async def scenario() -> list[Device]:
        async with control_plane(workspace) as (broker, _):
            driver = PahoDriver()
            devices = [
                Device(
                    DeviceSettings(
                        f"short-0000{n}",
                        paths.device_cert(f"short-0000{n}"),
                        paths.device_key(f"short-0000{n}"),
                        paths.root_cert,
                        port=broker.port or 0,
                        publish_every=0.2,
                        renew_at=0.5,
                    ),
                    driver,
                )
                for n in (1, 2, 3)
            ]
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(d.run(stop)) for d in devices]
            deadline = asyncio.get_running_loop().time() + 20
            while any(d.stats.renewals < 3 for d in devices):
                assert asyncio.get_running_loop().time() < deadline, [d.stats for d in devices]
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*tasks)
            return devices

    devices = run(scenario())
    for device in devices:
        stats = device.stats
        assert stats.renewal_failures == {}
        assert stats.disconnects == []  # never cut off: each renewal moved the session in time
        assert stats.sent == stats.acknowledged > 0
        assert all(a.outcome is ConnectOutcome.CONNECTED for a in stats.attempts)
        history = workspace.registry.certificate_history(device.device_id)
        assert len(history) >= 4
        assert [status for _, status, _, _ in history[:-1]] == ["superseded"] * (len(history) - 1)
        # The lifetime is kept: six-second certificates stay six-second certificates.
        assert all(end - start == dt.timedelta(seconds=6) for _, _, start, end in history)
        on_disk = x509.load_pem_x509_certificate(device.settings.cert.read_bytes())
        assert on_disk.serial_number == history[-1][0]


def test_an_interrupted_key_swap_is_finished_or_undone(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("old cert")
    key.write_text("old key")
    (tmp_path / "key.pem.new").write_text("new key")  # crashed before the certificate arrived
    recover_identity(cert, key)
    assert (cert.read_text(), key.read_text()) == ("old cert", "old key")
    (tmp_path / "key.pem.new").write_text("new key")
    (tmp_path / "cert.pem.new").write_text("new cert")  # both complete: finish
    recover_identity(cert, key)
    assert (cert.read_text(), key.read_text()) == ("new cert", "new key")
    (tmp_path / "cert.pem.new").write_text("newer cert")  # key already renamed
    recover_identity(cert, key)
    assert cert.read_text() == "newer cert"
    assert not list(tmp_path.glob("*.new"))


def test_a_raw_request_on_the_wire_gets_a_reply(workspace: Workspace, tmp_path: Path) -> None:
    """The protocol as any MQTT client sees it: request topic in, JSON reply out."""
    create_claim(workspace, ClaimRules("batch-10"))
    claim = ClaimBundle(workspace.paths.claim_dir("batch-10"))

    async def scenario() -> bytes:
        async with control_plane(workspace) as (broker, _):
            prepared = prepare_enrollment("raw-1", claim.cert, claim.key)
            got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            settings = DeviceSettings(
                "raw-1", claim.cert, claim.key, claim.trust_anchor, port=broker.port or 0,
                client_id=f"enroll:{prepared.request_id}", subscribe_commands=False,
            )  # fmt: skip
            device = Device(settings, PahoDriver())
            await device.connect()
            reply = reply_topic(PROVISION, prepared.request_id)
            assert await device.subscribe(reply)
            device._client.message_callback_add(
                reply, lambda c, u, m: got.set_result(bytes(m.payload))
            )
            device.publish(request_topic(PROVISION, prepared.request_id), prepared.payload, qos=1)
            payload = await asyncio.wait_for(got, 10)
            await device.close()
            return payload

    reply = decode_reply(run(scenario()))
    assert reply.issued and "BEGIN CERTIFICATE" in reply.certificate


def test_enrollment_and_renewal_work_through_a_real_mosquitto(
    workspace: Workspace, tmp_path: Path
) -> None:
    """Nothing here needs our broker: the control plane checks every proof itself."""
    from tests.broker_support import running_mosquitto

    create_claim(workspace, ClaimRules("mosq-batch", max_uses=2))
    claim = ClaimBundle(workspace.paths.claim_dir("mosq-batch"))
    store = tmp_path / "store"

    async def scenario(port: int) -> tuple[list[EnrollmentResult], int, str]:
        requests = CertificateRequests(workspace)
        service = CertificateService(workspace, requests, host="127.0.0.1", port=port)
        await asyncio.to_thread(service.start)
        try:
            results = [
                await enroll(f"m-{n}", claim, store, port=port, timeout=10) for n in range(3)
            ]
            device = Device(
                DeviceSettings(
                    "m-0", store / "m-0" / "cert.pem", store / "m-0" / "key.pem",
                    workspace.paths.root_cert, port=port,
                ),
                PahoDriver(),
            )  # fmt: skip
            assert (await device.connect()).outcome is ConnectOutcome.CONNECTED
            reply = await device.renew()
            await device.close()
            return results, device.stats.renewals, reply.reason
        finally:
            await asyncio.to_thread(service.stop)

    with running_mosquitto(workspace.paths.root, tmp_path / "mosquitto.conf") as port:
        results, renewals, reason = run(scenario(port))
    assert [r.status for r in results] == ["enrolled", "enrolled", "refused"], results
    assert results[2].reason == "claim_exhausted"
    assert (renewals, reason) == (1, "")
    assert len(workspace.registry.certificate_history("m-0")) == 2


def test_the_commands_enroll_a_device_end_to_end(workspace: Workspace, tmp_path: Path) -> None:
    """fleet claim create, fleet broker, fleet serve --broker and fleet enroll as processes."""
    import subprocess

    from tests.conftest import fleet_command

    root = workspace.paths.root
    made = subprocess.run(
        fleet_command("claim", "create", "--dir", root, "--name", "line-3", "--max-uses", "1"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    serve = None
    with launched_broker(root) as broker:
        target = broker.target
        try:
            serve = subprocess.Popen(
                fleet_command("serve", "--dir", root, "--port", "0", "--broker", target),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            assert serve.stdout is not None
            assert "answering certificate requests" in serve.stdout.readline()
            claim = root / "claims" / "line-3"
            enroll_args: list[str | Path] = [
                "enroll", "--claim", claim, "--store", tmp_path / "dev", "--target", target,
            ]  # fmt: skip
            first = subprocess.run(
                fleet_command(*enroll_args, "--id", "pump-1", "--hardware-serial", "SN-9"),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            second = subprocess.run(
                fleet_command(*enroll_args, "--id", "pump-2"),
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            if serve is not None:
                serve.terminate()
                serve.wait(20)
    assert first.returncode == 0, first.stderr
    assert "enrolled pump-1" in first.stdout
    assert (tmp_path / "dev" / "pump-1" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert second.returncode == 1 and "refused (claim_exhausted)" in second.stderr
    listing = subprocess.run(
        fleet_command("claim", "list", "--dir", root, "--json"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    (claim_row,) = json.loads(listing.stdout)["claims"]
    assert (claim_row["uses"], claim_row["status"]) == (1, "exhausted")
    shown = subprocess.run(
        fleet_command("show", "pump-1", "--dir", root), capture_output=True, text=True, timeout=60
    )
    assert "through claim line-3" in shown.stdout and "SN-9" in shown.stdout


def test_renewal_and_enrollment_refusals_name_their_reason(workspace: Workspace) -> None:
    from device.requests import prepare_renewal
    from fleet import revoke_device

    provision_devices(workspace, ProvisionSpec(count=3, prefix="r"))
    paths = workspace.paths
    requests = CertificateRequests(workspace)

    def renewal(device_id: str, as_device: str | None = None) -> bytes:
        owner = as_device or device_id
        prepared = prepare_renewal(owner, paths.device_cert(owner), paths.device_key(owner))
        return prepared.payload

    assert requests.renew("r-00001", renewal("r-00001")).issued
    # Another device's certificate, even with its valid proof, renews nobody else.
    stolen = requests.renew("r-00002", renewal("r-00002", as_device="r-00003"))
    assert stolen.reason == "not_your_certificate"
    # A proof over another CSR (or by another key) fails.
    body = json.loads(renewal("r-00002"))
    body["csr"] = json.loads(renewal("r-00003"))["csr"]
    assert requests.renew("r-00002", json.dumps(body).encode()).reason == "bad_signature"
    revoke_device(workspace, "r-00003")
    assert requests.renew("r-00003", renewal("r-00003")).reason == "certificate_revoked"
    # Renewals are counted by outcome on the control plane's /metrics.
    assert _count(requests, "renew", "issued") == 1
    assert _count(requests, "renew", "bad_signature") == 1

    create_claim(workspace, ClaimRules("short", valid_for=dt.timedelta(hours=1)))
    claim = ClaimBundle(paths.claim_dir("short"))
    prepared = prepare_enrollment("late-1", claim.cert, claim.key)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    expired = requests.enroll(prepared.request_id, prepared.payload, now=later)
    assert expired.reason == "claim_expired"
    device_cert = paths.device_cert("r-00001").read_text()
    body = json.loads(prepared.payload)
    body["claim_certificate"] = device_cert  # a device certificate is no claim
    refused = requests.enroll(prepared.request_id, json.dumps(body).encode())
    assert refused.reason == "not_a_claim"

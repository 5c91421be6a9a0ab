"""``fleet serve``: CRL and OCSP over HTTP, checked with openssl and a plain HTTP client; a
broker fed from the URL; ``fleet crl sync`` feeding a real Mosquitto."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from broker import BrokerSettings, launched_broker
from fleet import (
    FleetConfig,
    KeyType,
    ProvisionSpec,
    Workspace,
    generate_private_key,
    init_workspace,
    provision_devices,
    revoke_device,
)
from fleet.controlplane.server import ControlPlane
from fleet.kernel.identity import DeviceIdentity
from fleet.store.testing import rogue_authority
from tests.broker_support import (
    BrokerThread,
    device_credentials,
    free_port,
    mosquitto_pub,
    paho_device,
)
from tests.conftest import fleet_command, openssl, require_tool


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Workspace, ControlPlane]]:
    port = free_port()
    directory = tmp_path / "fleet"
    init_workspace(
        directory,
        config=FleetConfig(
            crl_url=f"http://127.0.0.1:{port}/crl", crl_valid_for=dt.timedelta(hours=1)
        ),
    )
    workspace = Workspace.open(directory)
    provision_devices(workspace, ProvisionSpec(count=3, prefix="dev"))
    plane = ControlPlane(workspace, port=port)
    plane.start()
    try:
        yield workspace, plane
    finally:
        plane.stop()


def _ocsp(workspace: Workspace, plane: ControlPlane, cert: Path, issuer: Path) -> str:
    result = openssl(
        "ocsp", "-issuer", str(issuer), "-cert", str(cert), "-url", f"{plane.url}/ocsp",
        "-CAfile", str(workspace.paths.root_cert), "-resp_text", check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


def test_openssl_ocsp_good_then_revoked_then_unknown(
    served: tuple[Workspace, ControlPlane], tmp_path: Path
) -> None:
    workspace, plane = served
    paths = workspace.paths
    cert = paths.device_cert("dev-00001")
    before = _ocsp(workspace, plane, cert, paths.issuing_cert)
    assert "Response verify OK" in before and f"{cert}: good" in before

    revoke_device(workspace, "dev-00001", reason=x509.ReasonFlags.key_compromise)
    after = _ocsp(workspace, plane, cert, paths.issuing_cert)
    assert "Response verify OK" in after and f"{cert}: revoked" in after
    assert "Revocation Reason: keyCompromise" in after

    # issued by the fleet's CA but never recorded: the registry does not know it
    key = generate_private_key(KeyType.EC_P256)
    now = dt.datetime.now(dt.UTC)
    stray = workspace.ca.issue_device(
        DeviceIdentity("stray", "bronze", "prod", workspace.config.trust_domain),
        key.public_key(),
        not_before=now,
        not_after=now + dt.timedelta(days=1),
    )
    stray_path = tmp_path / "stray.pem"
    stray_path.write_bytes(stray.public_bytes(Encoding.PEM))
    unknown = _ocsp(workspace, plane, stray_path, paths.issuing_cert)
    assert "Response verify OK" in unknown and f"{stray_path}: unknown" in unknown

    # a certificate of another CA: this responder is not authorised to answer
    rogue = rogue_authority(workspace)
    rogue_issuer = tmp_path / "rogue-issuer.pem"
    rogue_issuer.write_bytes(rogue.issuing_pem)
    refused = _ocsp(workspace, plane, cert, rogue_issuer)
    assert "unauthorized" in refused.lower()


def test_crl_and_ocsp_over_plain_http(served: tuple[Workspace, ControlPlane]) -> None:
    workspace, plane = served
    serial = revoke_device(workspace, "dev-00002").revoked_serials[0]
    with urllib.request.urlopen(f"{plane.url}/crl", timeout=10) as response:
        assert response.headers["Content-Type"] == "application/pkix-crl"
        crl = x509.load_der_x509_crl(response.read())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.is_signature_valid(workspace.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    with urllib.request.urlopen(f"{plane.url}/crl.pem", timeout=10) as response:
        assert response.read() == workspace.paths.crl.read_bytes()

    cert = x509.load_pem_x509_certificate(workspace.paths.device_cert("dev-00002").read_bytes())
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, workspace.ca.issuing_cert, hashes.SHA256())
        .build()
        .public_bytes(Encoding.DER)
    )
    encoded = urllib.parse.quote(base64.b64encode(request).decode(), safe="")
    with urllib.request.urlopen(f"{plane.url}/ocsp/{encoded}", timeout=10) as response:
        answer = ocsp.load_der_ocsp_response(response.read())
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert answer.serial_number == serial

    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{plane.url}/nothing", timeout=10)
    assert missing.value.code == 404
    assert b"no such resource" in missing.value.read()


def test_the_crl_is_republished_when_half_its_life_is_gone(
    served: tuple[Workspace, ControlPlane],
) -> None:
    workspace, plane = served
    crl = x509.load_pem_x509_crl(workspace.paths.crl.read_bytes())
    assert not plane.refresh_crl()  # fresh: nothing to do
    later = crl.last_update_utc + dt.timedelta(minutes=31)
    assert plane.refresh_crl(now=later)
    fresh = x509.load_pem_x509_crl(workspace.paths.crl.read_bytes())
    assert fresh.next_update_utc == later.replace(microsecond=0) + dt.timedelta(hours=1)


def test_a_broker_fed_from_the_url_cuts_off_a_revoked_device(
    served: tuple[Workspace, ControlPlane],
) -> None:
    workspace, plane = served
    settings = BrokerSettings(
        workspace=workspace.paths.root,
        port=0,
        metrics_port=None,
        event_log=False,
        crl_url=f"{plane.url}/crl.pem",
        crl_url_interval=0.2,
    )
    broker = BrokerThread(settings)
    try:
        device = paho_device(
            broker.port, workspace.paths.root_cert, device_credentials(workspace, "dev-00003")
        )
        assert device.connected.wait(10)
        revoke_device(workspace, "dev-00003")
        assert device.disconnected.wait(5), "revocation reached the broker over HTTP"
        broker.wait_for_event(lambda e: e.get("reason") == "revoked")
        device.stop()
        plane.stop()  # the control plane goes away: the broker says so, and keeps its CRL
        event = broker.wait_for_event(lambda e: e["event"] == "crl_fetch_failed")
        assert plane.url in event["detail"]
    finally:
        broker.stop()


def _crl_number_seen(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("mtls_crl_number "):
                return float(line.split()[1])
    raise AssertionError("no mtls_crl_number on /metrics")


def _seconds_until_the_broker_has_the_new_crl(
    served: tuple[Workspace, ControlPlane], broker_dir: Path, every: str, device_id: str
) -> float | None:
    """Start ``fleet broker --crl-url-every EVERY`` on a copy of the workspace, revoke a device
    in the original, and time how long the broker takes to enforce that CRL (None: 2 s passed)."""
    workspace, plane = served
    with launched_broker(
        broker_dir, "--crl-url", f"{plane.url}/crl.pem", "--crl-url-every", every, metrics=True
    ) as broker:
        assert broker.metrics_url is not None
        before = _crl_number_seen(broker.metrics_url)
        revoke_device(workspace, device_id)
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            if _crl_number_seen(broker.metrics_url) > before:
                return time.monotonic() - started
            time.sleep(0.05)  # polling an HTTP endpoint of another process: nothing to await
        return None


def test_crl_url_every_sets_how_soon_a_revocation_reaches_the_broker(
    served: tuple[Workspace, ControlPlane], tmp_path: Path
) -> None:
    import shutil

    workspace, _ = served
    often, rarely = tmp_path / "often", tmp_path / "rarely"
    shutil.copytree(workspace.paths.root, often)
    shutil.copytree(workspace.paths.root, rarely)
    quick = _seconds_until_the_broker_has_the_new_crl(served, often, "0.2s", "dev-00001")
    assert quick is not None and quick < 1.5
    slow = _seconds_until_the_broker_has_the_new_crl(served, rarely, "1h", "dev-00002")
    assert slow is None  # fetched at start only: the revocation waits for the next hour


def test_crl_sync_feeds_a_real_mosquitto(
    served: tuple[Workspace, ControlPlane], tmp_path: Path
) -> None:
    mosquitto = require_tool("mosquitto")
    workspace, plane = served
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    emitted = subprocess.run(
        fleet_command("broker", "--dir", workspace.paths.root, "--port", str(port), "--emit-mosquitto-conf", conf),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert emitted.returncode == 0, emitted.stderr
    crlfile = tmp_path / "mosquitto-crl.pem"
    crlfile.write_bytes(workspace.paths.crl.read_bytes())
    text = conf.read_text().replace(
        f"crlfile {workspace.paths.crl.resolve()}", f"crlfile {crlfile}"
    )
    conf.write_text(text)
    server = subprocess.Popen(
        [mosquitto, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if "running" in line or "Opening ipv4 listen socket" in line:
                break
        ca = workspace.paths.root_cert
        victim = device_credentials(workspace, "dev-00001")
        assert mosquitto_pub(port, ca, victim, "devices/dev-00001/t", "hi").returncode == 0
        revoke_device(workspace, "dev-00001")
        synced = subprocess.run(
            fleet_command("crl", "sync", "--dir", workspace.paths.root, "--url", f"{plane.url}/crl.pem",
                          "--out", crlfile, "--signal", str(server.pid)),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert synced.returncode == 0, synced.stderr
        assert f"sent SIGHUP to {server.pid}" in synced.stdout
        # Mosquitto rereads its CRL in its main loop after the signal: give it a moment
        deadline = time.monotonic() + 5
        refused = mosquitto_pub(port, ca, victim, "devices/dev-00001/t", "hi")
        while refused.returncode == 0 and time.monotonic() < deadline:
            refused = mosquitto_pub(port, ca, victim, "devices/dev-00001/t", "hi")
        assert refused.returncode != 0, "Mosquitto reread its CRL after SIGHUP"
        good = device_credentials(workspace, "dev-00002")
        assert mosquitto_pub(port, ca, good, "devices/dev-00002/t", "hi").returncode == 0
        again = subprocess.run(
            fleet_command("crl", "sync", "--dir", workspace.paths.root, "--url", f"{plane.url}/crl.pem", "--out", crlfile),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "nothing changed" in again.stdout
    finally:
        server.terminate()
        server.wait(10)


def test_metrics_count_certificates_about_to_expire(
    served: tuple[Workspace, ControlPlane],
) -> None:
    workspace, plane = served  # 3 devices valid for 90 days
    now = dt.datetime.now(dt.UTC)
    provision_devices(
        workspace, ProvisionSpec(count=2, prefix="soon", valid_for=dt.timedelta(hours=2))
    )
    provision_devices(
        workspace,
        ProvisionSpec(
            count=1,
            prefix="old",
            not_before=now - dt.timedelta(days=2),
            valid_for=dt.timedelta(days=1),
        ),
    )
    revoke_device(workspace, "soon-00002")  # revoked: no longer expected to be renewed
    with urllib.request.urlopen(f"{plane.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fleet_certificates_")
    }
    assert samples['fleet_certificates_expiring{within="1h"}'] == 0
    assert samples['fleet_certificates_expiring{within="1d"}'] == 1
    assert samples['fleet_certificates_expiring{within="30d"}'] == 1
    assert samples["fleet_certificates_expired"] == 1


def test_a_broker_starts_on_the_served_crl_when_it_is_newer_than_its_file(
    served: tuple[Workspace, ControlPlane], tmp_path: Path
) -> None:
    import shutil

    workspace, plane = served
    elsewhere = tmp_path / "broker-host"
    shutil.copytree(workspace.paths.root, elsewhere)  # a broker machine with yesterday's files
    revoke_device(workspace, "dev-00001")
    settings = BrokerSettings(
        workspace=elsewhere,
        port=0,
        metrics_port=None,
        event_log=False,
        crl_url=f"{plane.url}/crl.pem",
        crl_url_interval=3600,  # no polling in this test: only the fetch at start
    )
    broker = BrokerThread(settings)
    try:
        copy = Workspace.open(elsewhere)
        device = paho_device(
            broker.port, copy.paths.root_cert, device_credentials(copy, "dev-00001")
        )
        assert device.disconnected.wait(10) and not device.connected.is_set()
        assert broker.outcome_count("revoked") == 1
    finally:
        broker.stop()

"""PKI artefacts as other brokers expect them (RFC 5280), and the emergency of a compromised
issuing CA: every CRL carries an Issuing Distribution Point and an Authority Key Identifier, the
root publishes its own CRL (so ``openssl verify -crl_check_all`` decides every link), and
``fleet ca revoke-issuing`` puts a replaced intermediate on it: the broker closes the sessions it
issued (``issuer_revoked``) and refuses them in the handshake, the new chain's devices carry on."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509

from device import ConnectOutcome, Device, DeviceSettings, PahoDriver
from fleet import ProvisionSpec, Workspace, provision_devices
from fleet.store.ca_rotation import rotate_issuing_ca
from fleet.store.revocation import split_pem_crls
from tests.broker_support import BrokerThread, settings_for_tests
from tests.conftest import fleet_command, openssl


def _crls(workspace: Workspace) -> list[x509.CertificateRevocationList]:
    return [x509.load_pem_x509_crl(b) for b in split_pem_crls(workspace.paths.crl.read_bytes())]


def _verify_all(workspace: Workspace, device_id: str, issuer: Path) -> str:
    result = openssl(
        "verify", "-crl_check_all", "-CAfile", str(workspace.paths.root_cert),
        "-untrusted", str(issuer), "-CRLfile", str(workspace.paths.crl),
        str(workspace.paths.device_cert(device_id)), check=False,
    )  # fmt: skip
    return result.stdout + result.stderr


def test_every_crl_carries_its_scope_and_issuer_and_the_root_has_one(
    workspace: Workspace,
) -> None:
    provision_devices(workspace, ProvisionSpec(count=2, prefix="dev"))
    subprocess.run(fleet_command("revoke", "dev-00002", "--dir", workspace.paths.root), check=True)
    issuing, root = _crls(workspace)
    for crl, covers_cas in ((issuing, False), (root, True)):
        scope = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
        assert scope.critical  # RFC 5280 5.2.5
        assert scope.value.only_contains_ca_certs is covers_cas
        assert scope.value.only_contains_user_certs is not covers_cas
        crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert root.issuer == workspace.ca.root_cert.subject and len(root) == 0
    assert root.is_signature_valid(workspace.ca.root_cert.public_key())  # type: ignore[arg-type]

    issuer = workspace.paths.issuing_cert
    assert _verify_all(workspace, "dev-00001", issuer).strip().endswith(": OK")
    refused = _verify_all(workspace, "dev-00002", issuer)
    assert "error 23 at 0 depth lookup: certificate revoked" in refused


def test_a_revoked_issuing_ca_is_cut_off_everywhere_and_the_new_chain_carries_on(
    workspace: Workspace,
) -> None:
    provision_devices(workspace, ProvisionSpec(count=2, prefix="old"))
    old_issuer = workspace.paths.ca_dir / "old-issuing.crt"
    old_issuer.write_bytes(workspace.paths.issuing_cert.read_bytes())
    old_serial = workspace.ca.issuing_cert.serial_number
    rotate_issuing_ca(workspace)
    workspace = Workspace.open(workspace.paths.root)
    provision_devices(workspace, ProvisionSpec(count=1, prefix="new"))
    broker = BrokerThread(settings_for_tests(workspace))

    def settings(device_id: str) -> DeviceSettings:
        paths = workspace.paths
        return DeviceSettings(
            device_id, paths.device_cert(device_id), paths.device_key(device_id),
            paths.root_cert, port=broker.port, reconnect=False,
        )  # fmt: skip

    async def connect_all() -> tuple[list[Device], list[ConnectOutcome]]:
        driver = PahoDriver()
        devices = [Device(settings(d), driver) for d in ("old-00001", "old-00002", "new-00001")]
        return devices, [(await d.connect()).outcome for d in devices]

    try:
        devices, outcomes = broker.call(connect_all())
        assert outcomes == [ConnectOutcome.CONNECTED] * 3
        result = subprocess.run(
            fleet_command("ca", "revoke-issuing", "--dir", workspace.paths.root),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "in the root's CRL (ca-compromise)" in result.stdout
        closed = [_session_closed(broker, d) for d in ("old-00001", "old-00002")]
        assert {e["reason"] for e in closed} == {"issuer_revoked"}

        async def again() -> tuple[object, bool]:
            retry = await Device(settings("old-00001"), PahoDriver()).connect()
            return (retry.outcome, retry.detail), devices[2].connected

        (refused, bystander_connected) = broker.call(again())
        assert refused == (ConnectOutcome.REJECTED_BY_BROKER, "certificate_revoked")
        assert bystander_connected, "the new chain's device is untouched"
        rejection = broker.wait_for_event(
            lambda e: e["event"] == "rejected" and e.get("reason") == "issuer_revoked"
        )
        assert rejection["reason"] == "issuer_revoked"
    finally:
        broker.stop()

    root_crl = _crls(workspace)[-1]
    entry = root_crl.get_revoked_certificate_by_serial_number(old_serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.ca_compromise
    )
    refused_chain = _verify_all(workspace, "old-00001", old_issuer)
    assert "error 23 at 1 depth lookup: certificate revoked" in refused_chain  # names the CA
    assert (
        _verify_all(workspace, "new-00001", workspace.paths.issuing_cert).strip().endswith(": OK")
    )


def _session_closed(broker: BrokerThread, device_id: str) -> dict[str, object]:
    return broker.wait_for_event(
        lambda e: e["event"] == "session_closed" and e.get("device") == device_id
    )


def test_the_current_issuing_ca_is_not_revoked_without_a_rotation(workspace: Workspace) -> None:
    serial = format(workspace.ca.issuing_cert.serial_number, "X")
    result = subprocess.run(
        fleet_command("ca", "revoke-issuing", "--serial", serial, "--dir", workspace.paths.root),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "is the current issuing CA: run 'fleet ca rotate' first" in result.stderr
    assert len(_crls(workspace)[-1]) == 0  # nothing revoked

"""fleet provision: per-device keys and certificates that openssl accepts, registry in agreement."""

from __future__ import annotations

import datetime as dt
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet import (
    CertificateError,
    DeviceIdentity,
    KeyType,
    ProvisionSpec,
    UsageError,
    Workspace,
    export_pkcs12,
    identity_from_certificate,
    provision_devices,
    provision_from_csr,
)
from tests.conftest import openssl, openssl_verify


def _chain(workspace: Workspace, device_id: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(workspace.paths.device_cert(device_id).read_bytes())


def _verify(workspace: Workspace, device_id: str, *extra: str) -> str:
    return openssl_verify(
        workspace, workspace.paths.device_cert(device_id), *extra, purpose="sslclient"
    )


def assert_registry_matches_files(workspace: Workspace) -> None:
    """Every visible registry row has its files, and every device directory has its row."""
    rows = {record.device_id: record for record in workspace.registry.devices()}
    directories = {p.name for p in workspace.paths.devices_dir.iterdir()}
    assert directories == set(rows), "registry rows and device directories disagree"
    for device_id, record in rows.items():
        leaf = _chain(workspace, device_id)[0]
        assert leaf.serial_number == record.serial
        if record.key_source == "generated":
            assert workspace.paths.device_key(device_id).is_file()


def test_each_device_gets_its_own_key_and_certificate(shared_workspace: Workspace) -> None:
    ws = shared_workspace
    serials = set()
    for record in ws.registry.devices():
        chain = _chain(ws, record.device_id)
        assert len(chain) == 2 and chain[1] == ws.ca.issuing_cert, "cert.pem is leaf + intermediate"
        leaf = chain[0]
        key = serialization.load_pem_private_key(
            ws.paths.device_key(record.device_id).read_bytes(), None
        )
        assert key.public_key() == leaf.public_key(), "key.pem belongs to cert.pem"
        assert stat.S_IMODE(ws.paths.device_key(record.device_id).stat().st_mode) == 0o600
        serials.add(leaf.serial_number)
    assert len(serials) == ws.registry.count() == 15


def test_certificate_carries_identity_tier_env_and_client_eku_only(
    shared_workspace: Workspace,
) -> None:
    leaf = _chain(shared_workspace, "gateway-00002")[0]
    assert identity_from_certificate(leaf) == DeviceIdentity(
        device_id="gateway-00002", tier="gold", env="dev", trust_domain="test.example"
    )
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gateway-00002"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://test.example/device/gateway-00002"
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = shared_workspace.ca.issuing_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    assert ski.digest and aki.key_identifier == issuer_ski.digest
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_openssl_verifies_a_device_as_a_tls_client(shared_workspace: Workspace) -> None:
    assert _verify(shared_workspace, "sensor-00001").strip().endswith(": OK")


def test_ids_continue_after_the_highest_existing_one(workspace: Workspace) -> None:
    first = provision_devices(workspace, ProvisionSpec(count=2, prefix="pump"))
    second = provision_devices(workspace, ProvisionSpec(count=2, prefix="pump"))
    assert first.device_ids == ["pump-00001", "pump-00002"]
    assert second.device_ids == ["pump-00003", "pump-00004"]


def test_a_30_second_certificate_expires_30_seconds_after_issue(workspace: Workspace) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    result = provision_devices(
        workspace, ProvisionSpec(count=1, valid_for=dt.timedelta(seconds=30))
    )
    leaf = _chain(workspace, result.device_ids[0])[0]
    assert before <= leaf.not_valid_before_utc <= dt.datetime.now(dt.UTC)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(seconds=30)
    issued = int(leaf.not_valid_before_utc.timestamp())
    device = result.device_ids[0]
    assert _verify(workspace, device, "-attime", str(issued + 29)).strip().endswith(": OK")
    assert "certificate has expired" in _verify(workspace, device, "-attime", str(issued + 31))


def test_expired_and_not_yet_valid_fixtures(workspace: Workspace) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = provision_devices(
        workspace,
        ProvisionSpec(
            count=1,
            prefix="old",
            not_before=now - dt.timedelta(days=2),
            valid_for=dt.timedelta(days=1),
        ),
    )
    future = provision_devices(
        workspace, ProvisionSpec(count=1, prefix="future", not_before=now + dt.timedelta(days=1))
    )
    assert "certificate has expired" in _verify(workspace, expired.device_ids[0])
    assert "certificate is not yet valid" in _verify(workspace, future.device_ids[0])
    statuses = {r.device_id: r.effective_status(now) for r in workspace.registry.devices()}
    assert statuses == {"old-00001": "expired", "future-00001": "not-yet-valid"}


@pytest.mark.parametrize("key_type", [KeyType.RSA2048, KeyType.EC_P384])
def test_other_key_types(workspace: Workspace, key_type: KeyType) -> None:
    result = provision_devices(workspace, ProvisionSpec(count=2, key_type=key_type))
    for device_id in result.device_ids:
        assert _verify(workspace, device_id).strip().endswith(": OK")
        assert workspace.registry.get(device_id).key_type == key_type.value


def test_a_large_batch_uses_worker_processes_and_stays_consistent(workspace: Workspace) -> None:
    result = provision_devices(workspace, ProvisionSpec(count=400, prefix="bulk"), workers=2)
    assert result.workers == 2
    assert workspace.registry.count() == 400
    assert_registry_matches_files(workspace)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ProvisionSpec(count=0), "give a positive number"),
        (ProvisionSpec(count=-3), "give a positive number"),
        (ProvisionSpec(count=1, prefix="Bad/Prefix"), "invalid device id"),
        (ProvisionSpec(count=1, tier="platinum"), "invalid tier 'platinum'"),
        (ProvisionSpec(count=1, env="staging"), "invalid environment 'staging'"),
    ],
)
def test_bad_requests_change_nothing(
    workspace: Workspace, spec: ProvisionSpec, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        provision_devices(workspace, spec)
    assert workspace.registry.count() == 0
    assert list(workspace.paths.devices_dir.iterdir()) == []


# -- CSR ----------------------------------------------------------------------------------------


def _csr(common_name: str = "anything") -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def test_csr_is_signed_and_the_key_never_enters_the_workspace(workspace: Workspace) -> None:
    key, csr_pem = _csr(common_name="admin")  # the CSR asks to be 'admin': the fleet ignores that
    cert = provision_from_csr(workspace, csr_pem, device_id="field-7", tier="silver")
    assert cert.public_key() == key.public_key()
    assert identity_from_certificate(cert).device_id == "field-7"
    assert not workspace.paths.device_key("field-7").exists()
    assert workspace.registry.get("field-7").key_source == "csr"
    assert _verify(workspace, "field-7").strip().endswith(": OK")
    assert_registry_matches_files(workspace)


def test_csr_with_a_broken_signature_is_refused_naming_the_device(workspace: Workspace) -> None:
    _, csr_pem = _csr()
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # flip a bit inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(
        CertificateError, match=r"device 'field-8': the CSR's signature does not verify"
    ):
        provision_from_csr(workspace, tampered, device_id="field-8")
    assert workspace.registry.count() == 0


def test_csr_for_a_taken_id_is_refused(workspace: Workspace) -> None:
    provision_from_csr(workspace, _csr()[1], device_id="field-9")
    with pytest.raises(UsageError, match="'field-9' already exists"):
        provision_from_csr(workspace, _csr()[1], device_id="field-9")


def test_garbage_instead_of_a_csr(workspace: Workspace) -> None:
    with pytest.raises(UsageError, match="not a PEM CSR"):
        provision_from_csr(workspace, b"hello", device_id="field-10")


# -- PKCS#12 ------------------------------------------------------------------------------------


def test_pkcs12_export_is_0600_and_openssl_reads_it(
    shared_workspace: Workspace, tmp_path: Path
) -> None:
    out = export_pkcs12(shared_workspace, "sensor-00003", tmp_path / "s3.p12", password="s3cret")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    bundle = pkcs12.load_pkcs12(out.read_bytes(), b"s3cret")
    assert bundle.cert is not None and bundle.key is not None
    assert bundle.cert.certificate == _chain(shared_workspace, "sensor-00003")[0]
    assert len(bundle.additional_certs) == 2  # intermediate and root
    info = openssl("pkcs12", "-in", str(out), "-passin", "pass:s3cret", "-nokeys", "-info")
    assert re.search(r"subject=.*CN ?= ?sensor-00003", info.stdout), info.stdout


def test_pkcs12_export_of_a_csr_device_explains_why_not(
    workspace: Workspace, tmp_path: Path
) -> None:
    provision_from_csr(workspace, _csr()[1], device_id="field-11")
    with pytest.raises(CertificateError, match="'field-11': no private key in the workspace"):
        export_pkcs12(workspace, "field-11", tmp_path / "x.p12")

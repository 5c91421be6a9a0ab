"""Renewal (same key, new certificate, the old one superseded) and rotation of the issuing CA."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import Result

from fleet import ProvisionSpec, RegistryError, Workspace, provision_devices, revoke_device
from fleet.kernel.files import write_public, write_secret
from fleet.kernel.keys import load_private_key, private_key_pem
from fleet.store.ca import create_intermediate_ca
from fleet.store.ca_rotation import retire_previous_issuers, rotate_issuing_ca
from fleet.store.renewal import renew_device
from fleet.store.revocation import revoke_superseded, split_pem_crls
from tests.conftest import openssl

Cli = Callable[..., Result]


def _crls(workspace: Workspace) -> list[x509.CertificateRevocationList]:
    return [x509.load_pem_x509_crl(b) for b in split_pem_crls(workspace.paths.crl.read_bytes())]


def _verify(workspace: Workspace, device_id: str) -> None:
    """openssl verifies the device's chain (leaf + its own intermediate) against the root."""
    cert = workspace.paths.device_cert(device_id)
    result = openssl(
        "verify", "-CAfile", str(workspace.paths.root_cert), "-untrusted", str(cert), str(cert),
        check=False,
    )  # fmt: skip
    assert result.returncode == 0 and ": OK" in result.stdout, result.stdout + result.stderr


def test_renewal_supersedes_and_revoking_superseded_keeps_the_device(
    workspace: Workspace, cli: Cli
) -> None:
    (device_id,) = provision_devices(workspace, ProvisionSpec(count=1, prefix="s")).device_ids
    old = workspace.registry.get(device_id).serial
    key_before = workspace.paths.device_key(device_id).read_bytes()

    result = cli("renew", device_id, "--dir", workspace.paths.root, "--valid-for", "2d")
    assert result.exit_code == 0, result.output
    record = workspace.registry.get(device_id)
    assert record.serial != old and record.status == "active"
    assert record.not_after - record.not_before == dt.timedelta(days=2)
    assert workspace.paths.device_key(device_id).read_bytes() == key_before  # same key
    leaf = x509.load_pem_x509_certificate(workspace.paths.device_cert(device_id).read_bytes())
    assert leaf.serial_number == record.serial
    assert [(s, status) for s, status, *_ in workspace.registry.certificate_history(device_id)] == [
        (old, "superseded"),
        (record.serial, "active"),
    ]
    _verify(workspace, device_id)

    result = cli("revoke", device_id, "--dir", workspace.paths.root, "--superseded-only")
    assert result.exit_code == 0, result.output
    revoked = {entry.serial_number for crl in _crls(workspace) for entry in crl}
    assert revoked == {old}
    assert workspace.registry.get(device_id).status == "active"
    again = revoke_superseded(workspace, device_id)
    assert not again.changed  # nothing left to revoke, nothing published


def test_a_revoked_device_cannot_be_renewed(workspace: Workspace) -> None:
    (device_id,) = provision_devices(workspace, ProvisionSpec(count=1, prefix="s")).device_ids
    revoke_device(workspace, device_id)
    before = workspace.paths.device_cert(device_id).read_bytes()
    with pytest.raises(RegistryError, match="is revoked; provision a new device"):
        renew_device(workspace, device_id)
    assert workspace.paths.device_cert(device_id).read_bytes() == before


def test_ca_rotation_overlaps_then_retires(workspace: Workspace, cli: Cli) -> None:
    (old_device,) = provision_devices(workspace, ProvisionSpec(count=1, prefix="old")).device_ids
    old_issuer = workspace.ca.issuing_cert

    result = cli("ca", "rotate", "--dir", workspace.paths.root)
    assert result.exit_code == 0, result.output
    rotated = Workspace.open(workspace.paths.root)
    new_issuer = rotated.ca.issuing_cert
    assert new_issuer.serial_number != old_issuer.serial_number
    root = rotated.ca.root_cert.subject  # the root's own CRL comes last
    assert [crl.issuer for crl in _crls(rotated)] == [new_issuer.subject, old_issuer.subject, root]
    (previous_key,) = rotated.paths.previous_issuers_dir.glob("*.key")
    assert stat.S_IMODE(previous_key.stat().st_mode) == 0o600

    (new_device,) = provision_devices(rotated, ProvisionSpec(count=1, prefix="new")).device_ids
    chain = x509.load_pem_x509_certificates(rotated.paths.device_cert(new_device).read_bytes())
    assert chain[0].issuer == new_issuer.subject and chain[1] == new_issuer
    _verify(rotated, old_device)  # both chains verify during the overlap
    _verify(rotated, new_device)

    result = cli("ca", "retire", "--dir", workspace.paths.root)
    assert result.exit_code == 0, result.output
    assert [crl.issuer for crl in _crls(rotated)] == [new_issuer.subject, root]
    assert not list(rotated.paths.previous_issuers_dir.glob("*"))
    assert len(list(rotated.paths.retired_issuers_dir.glob("*.crt"))) == 1
    result = cli("ca", "retire", "--dir", workspace.paths.root)
    assert "no previous issuing CA to retire; nothing changed" in result.output


def _stage_rotation(workspace: Workspace) -> x509.Certificate:
    """What rotate_issuing_ca writes before it swaps anything in."""
    paths = workspace.paths
    root_key = load_private_key(paths.root_key.read_bytes(), source="root")
    now = dt.datetime.now(dt.UTC)
    cert, key = create_intermediate_ca(
        parent_cert=workspace.ca.root_cert,
        parent_key=root_key,
        common_name="staged",
        organization="fleet.local",
        key_type=workspace.config.key_type,
        not_before=now,
        not_after=now + dt.timedelta(days=30),
    )
    paths.next_issuer_dir.mkdir(mode=0o700)
    write_secret(paths.next_issuer_dir / "issuing.key", private_key_pem(key))
    write_public(paths.next_issuer_dir / "issuing.crt", cert.public_bytes(Encoding.PEM))
    return cert


def test_a_rotation_interrupted_before_the_swap_is_finished_by_the_next_command(
    workspace: Workspace,
) -> None:
    old = workspace.ca.issuing_cert
    staged = _stage_rotation(workspace)
    reopened = Workspace.open(workspace.paths.root)
    assert reopened.ca.issuing_cert == staged
    assert not reopened.paths.next_issuer_dir.exists()
    (kept,) = reopened.paths.previous_issuer_certs()
    assert x509.load_pem_x509_certificate(kept.read_bytes()) == old


def test_a_rotation_interrupted_between_key_and_certificate_is_finished(
    workspace: Workspace,
) -> None:
    old = workspace.ca.issuing_cert
    staged = _stage_rotation(workspace)
    paths = workspace.paths
    # the crash came after the old issuer was kept and the new key moved in
    from fleet.store.ca_rotation import _keep_previous

    _keep_previous(paths, old)
    os.replace(paths.next_issuer_dir / "issuing.key", paths.issuing_key)
    reopened = Workspace.open(paths.root)
    assert reopened.ca.issuing_cert == staged
    (device_id,) = provision_devices(reopened, ProvisionSpec(count=1, prefix="x")).device_ids
    _verify(reopened, device_id)  # the key and the certificate in place belong together


def test_rotating_twice_keeps_both_predecessors_until_retired(workspace: Workspace) -> None:
    rotate_issuing_ca(workspace)
    rotate_issuing_ca(workspace)
    assert len(workspace.paths.previous_issuer_certs()) == 2
    assert len(_crls(workspace)) == 3 + 1  # and the root's
    assert len(retire_previous_issuers(workspace)) == 2
    assert len(_crls(workspace)) == 1 + 1

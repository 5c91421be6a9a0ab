"""fleet revoke: registry and CRL agree, openssl enforces it, revoking twice changes nothing."""

from __future__ import annotations

import re
import subprocess

import pytest
from cryptography import x509

from fleet import (
    ProvisionSpec,
    UnknownDeviceError,
    UsageError,
    Workspace,
    provision_devices,
    revoke_device,
)
from fleet.store.ca import parse_revocation_reason
from fleet.store.revocation import load_crl, publish_crl
from tests.conftest import fleet_command, openssl


@pytest.fixture
def fleet_of_five(workspace: Workspace) -> Workspace:
    provision_devices(workspace, ProvisionSpec(count=5, prefix="dev"))
    return workspace


def _openssl_crl_serials(workspace: Workspace) -> set[int]:
    text = openssl("crl", "-in", str(workspace.paths.crl), "-noout", "-text").stdout
    return {int(s, 16) for s in re.findall(r"Serial Number: ([0-9A-F]+)", text)}


def _verify_with_crl(workspace: Workspace, device_id: str) -> str:
    paths = workspace.paths
    result = openssl(
        "verify",
        "-crl_check",
        "-CAfile",
        str(paths.root_cert),
        "-untrusted",
        str(paths.issuing_cert),
        "-CRLfile",
        str(paths.crl),
        str(paths.device_cert(device_id)),
        check=False,
    )
    return result.stdout + result.stderr


def test_revoking_lists_exactly_the_revoked_serials(fleet_of_five: Workspace) -> None:
    ws = fleet_of_five
    revoke_device(ws, "dev-00002", reason=x509.ReasonFlags.key_compromise)
    revoke_device(ws, "dev-00004", reason=x509.ReasonFlags.superseded)
    expected = {ws.registry.get("dev-00002").serial, ws.registry.get("dev-00004").serial}
    assert _openssl_crl_serials(ws) == expected
    crl = load_crl(ws)
    reasons = {
        entry.serial_number: entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        for entry in crl
    }
    assert reasons == {
        ws.registry.get("dev-00002").serial: x509.ReasonFlags.key_compromise,
        ws.registry.get("dev-00004").serial: x509.ReasonFlags.superseded,
    }
    assert crl.is_signature_valid(ws.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc
    assert {r.device_id for r in ws.registry.devices(status="revoked")} == {
        "dev-00002",
        "dev-00004",
    }


def test_openssl_refuses_the_revoked_device_and_accepts_the_others(
    fleet_of_five: Workspace,
) -> None:
    revoke_device(fleet_of_five, "dev-00003")
    assert "certificate revoked" in _verify_with_crl(fleet_of_five, "dev-00003")
    for other in ("dev-00001", "dev-00002", "dev-00004", "dev-00005"):
        assert _verify_with_crl(fleet_of_five, other).strip().endswith(": OK"), other


def test_revoking_twice_says_so_and_changes_nothing(fleet_of_five: Workspace) -> None:
    first = revoke_device(fleet_of_five, "dev-00001")
    crl_before = fleet_of_five.paths.crl.read_bytes()
    second = revoke_device(fleet_of_five, "dev-00001")
    assert first.changed and not second.changed
    assert fleet_of_five.paths.crl.read_bytes() == crl_before


def test_each_publication_replaces_the_file_atomically_with_a_higher_number(
    fleet_of_five: Workspace,
) -> None:
    crl_path = fleet_of_five.paths.crl
    numbers: list[int] = []
    for device_id in ("dev-00001", "dev-00002", "dev-00003"):
        with crl_path.open("rb") as reader_of_the_old_file:
            old = crl_path.read_bytes()
            result = revoke_device(fleet_of_five, device_id)
            # A reader that opened the old CRL keeps the old, complete file: the new one was
            # written elsewhere and renamed over the path, never rewritten in place.
            assert reader_of_the_old_file.read() == old
        assert crl_path.read_bytes() != old
        assert result.crl_number is not None
        numbers.append(result.crl_number)
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    assert [p.name for p in crl_path.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert len(list(load_crl(fleet_of_five))) == 3


def test_republishing_keeps_the_entries_and_moves_next_update(fleet_of_five: Workspace) -> None:
    revoke_device(fleet_of_five, "dev-00005")
    before = load_crl(fleet_of_five)
    after = publish_crl(fleet_of_five)
    assert [e.serial_number for e in after] == [e.serial_number for e in before]
    assert after.next_update_utc is not None and before.next_update_utc is not None
    assert after.next_update_utc >= before.next_update_utc


def test_unknown_device(fleet_of_five: Workspace) -> None:
    with pytest.raises(UnknownDeviceError, match=r"unknown device 'dev-09999'.*fleet inventory"):
        revoke_device(fleet_of_five, "dev-09999")


def test_reasons_parse_from_the_cli_spelling() -> None:
    assert parse_revocation_reason("key-compromise") is x509.ReasonFlags.key_compromise
    assert (
        parse_revocation_reason("cessation_of_operation") is x509.ReasonFlags.cessation_of_operation
    )
    with pytest.raises(UsageError, match=r"unknown revocation reason 'lost'.*key-compromise"):
        parse_revocation_reason("lost")


def test_fleet_revoke_of_a_batch_publishes_one_crl(fleet_of_five: Workspace) -> None:
    """`fleet revoke ID ID` and `--prefix`, through the CLI process: one CRL per command, the
    bystanders untouched, registry and CRL agreeing."""
    ws = fleet_of_five
    provision_devices(ws, ProvisionSpec(count=3, prefix="cam"))
    number_before = _crl_number(ws)

    def fleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            fleet_command(*args, "--dir", ws.paths.root), capture_output=True, text=True, timeout=60
        )

    two = fleet("revoke", "dev-00001", "dev-00002", "--reason", "key-compromise")
    assert two.returncode == 0, two.stderr
    assert "revoked 2 device(s) with one CRL, reason key-compromise" in two.stdout
    assert _crl_number(ws) == number_before + 1
    batch = fleet("revoke", "--prefix", "cam")
    assert batch.returncode == 0 and "revoked 3 device(s) with one CRL" in batch.stdout
    assert _crl_number(ws) == number_before + 2
    revoked = {r.device_id for r in ws.registry.devices(status="revoked")}
    assert revoked == {"dev-00001", "dev-00002", "cam-00001", "cam-00002", "cam-00003"}
    listed = {entry.serial_number for entry in load_crl(ws)}
    assert listed == {e.serial for e in ws.registry.revoked_entries()}
    unknown = fleet("revoke", "dev-00003", "ghost")
    assert unknown.returncode != 0 and "ghost" in unknown.stderr
    assert ws.registry.get("dev-00003").status == "active", "nothing revoked when one id is wrong"


def _crl_number(ws: Workspace) -> int:
    crl = load_crl(ws)
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)

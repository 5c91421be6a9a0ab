"""A revocation cannot be lost: ``fleet revoke`` killed at every write leaves registry and CRL
agreeing once any command opens the workspace, and running it again finishes the job."""

from __future__ import annotations

import subprocess
from contextlib import closing

import pytest

from fleet import ProvisionSpec, Workspace, provision_devices, revoke_device
from fleet.store.registry import Registry
from fleet.store.revocation import load_crl
from tests.conftest import fleet_command, fleet_killed_at

# Every system call by which `fleet revoke` changes something on disk (SQLite writes its WAL
# with pwrite64 and syncs with fdatasync; the CRL is written, fsync-ed and renamed into place).
WRITES = ("pwrite64", "write", "fdatasync", "fsync", "rename", "unlink")
MAX_CALLS = 60  # far more than one run makes of any of them (about 30 pwrite64)


def _crl_serials(workspace: Workspace) -> set[int]:
    return {entry.serial_number for entry in load_crl(workspace)}


def _revoked_serials(workspace: Workspace, device_id: str) -> set[int]:
    history = workspace.registry.certificate_history(device_id)
    return {serial for serial, status, *_ in history if status == "revoked"}


def assert_registry_and_crl_agree(workspace: Workspace) -> None:
    """Every certificate the registry says is revoked is on the CRL, and only those; nothing
    a killed publisher wrote is left in ca/."""
    registry_revoked = {entry.serial for entry in workspace.registry.revoked_entries()}
    assert _crl_serials(workspace) == registry_revoked
    assert not workspace.registry.crl_publication_pending()
    leftovers = [p.name for p in workspace.paths.ca_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.slow
def test_fleet_revoke_killed_at_every_write_never_loses_the_revocation(
    workspace: Workspace,
) -> None:
    devices = iter(provision_devices(workspace, ProvisionSpec(count=80, prefix="dev")).device_ids)
    kills: dict[str, int] = {}
    windows = 0  # kills that left a committed revocation off the CRL (the window that matters)
    for syscall in WRITES:
        for nth in range(1, MAX_CALLS + 1):
            device_id = next(devices)
            code = fleet_killed_at(syscall, nth, "revoke", device_id, "--dir", workspace.paths.root)
            with closing(Registry(workspace.paths.db)) as raw:  # before any repair
                windows += raw.crl_publication_pending()
            reopened = Workspace.open(workspace.paths.root)  # what any next command does first
            assert_registry_and_crl_agree(reopened)
            result = revoke_device(reopened, device_id)  # running it again finishes the job
            assert _revoked_serials(reopened, device_id), device_id
            assert _revoked_serials(reopened, device_id) <= _crl_serials(reopened)
            if code == 0:
                assert not result.changed, "a finished revocation needs nothing more"
            assert_registry_and_crl_agree(reopened)
            if code == 0:
                break  # this run made fewer than `nth` such calls: every one was tried
            kills[syscall] = kills.get(syscall, 0) + 1
        else:
            pytest.fail(f"fleet revoke made more than {MAX_CALLS} {syscall} calls")
    # SQLite's commit (pwrite64) and the CRL's write, fsync and rename were all hit
    assert {"pwrite64", "write", "fsync", "rename"} <= set(kills), kills
    assert windows >= 2, "some kills fell between the registry commit and the new CRL"


def test_a_crl_that_lost_a_revocation_is_repaired_by_revoking_again(
    workspace: Workspace,
) -> None:
    (first, second) = provision_devices(workspace, ProvisionSpec(count=2, prefix="dev")).device_ids
    before = workspace.paths.crl.read_bytes()
    revoke_device(workspace, first)
    workspace.paths.crl.write_bytes(before)  # an old backup restored over the new CRL
    result = revoke_device(workspace, first)
    assert result.revoked_serials == []
    assert set(result.repaired_serials) == _revoked_serials(workspace, first)
    assert _crl_serials(workspace) == _revoked_serials(workspace, first)
    assert_registry_and_crl_agree(workspace)
    assert not _revoked_serials(workspace, second), "the bystander stays valid"


def test_the_cli_says_what_it_repaired(workspace: Workspace) -> None:
    (device_id,) = provision_devices(workspace, ProvisionSpec(count=1, prefix="dev")).device_ids
    before = workspace.paths.crl.read_bytes()
    revoke_device(workspace, device_id)
    workspace.paths.crl.write_bytes(before)
    result = subprocess.run(
        fleet_command("revoke", device_id, "--dir", workspace.paths.root),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "was revoked but the CRL lacked serial" in result.stdout
    assert_registry_and_crl_agree(Workspace.open(workspace.paths.root))

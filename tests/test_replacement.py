"""``fleet provision --id ID --replace``: a revoked device gets a new key and certificate under
the same id. The new pair works at once, the old one (a thief's copy) stays refused, the
registry keeps the history and agrees with the CRL, and a crash at any write loses nothing."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from contextlib import closing
from pathlib import Path

import pytest
from cryptography import x509

from broker import BrokerSettings, FleetBroker
from device import ConnectOutcome, Device, DeviceSettings, PahoDriver
from fleet import ProvisionSpec, Workspace, provision_devices, revoke_device
from fleet.store.registry import Registry
from fleet.store.replacement import replace_device
from fleet.store.revocation import load_crl
from tests.conftest import fleet_command, fleet_killed_at
from tests.test_revocation_durability import assert_registry_and_crl_agree


def _fleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fleet_command(*args), capture_output=True, text=True, timeout=60)


def _serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def _steal(workspace: Workspace, device_id: str, into: Path) -> tuple[Path, Path]:
    """A copy of the device's key and certificate, as a thief (or a lost unit) would hold it."""
    into.mkdir()
    cert = shutil.copy(workspace.paths.device_cert(device_id), into / "cert.pem")
    key = shutil.copy(workspace.paths.device_key(device_id), into / "key.pem")
    return Path(cert), Path(key)


def _settings(ws: Workspace, device_id: str, cert: Path, key: Path, port: int) -> DeviceSettings:
    return DeviceSettings(
        device_id, cert, key, ws.paths.root_cert, port=port, reconnect=False, publish_every=0.2
    )


def test_a_revoked_device_is_replaced_under_its_id_and_its_old_pair_stays_refused(
    workspace: Workspace, tmp_path: Path
) -> None:
    provision_devices(workspace, ProvisionSpec(count=2, prefix="meter"))
    root = workspace.paths.root
    stolen_cert, stolen_key = _steal(workspace, "meter-00001", tmp_path / "stolen")
    old_serial = _serial(stolen_cert)
    assert _fleet("revoke", "meter-00001", "--dir", root).returncode == 0

    result = _fleet("provision", "--dir", root, "--id", "meter-00001", "--replace")
    assert result.returncode == 0, result.stderr
    assert f"revoked before: {old_serial:X}" in result.stdout

    reopened = Workspace.open(root)
    cert_path = reopened.paths.device_cert("meter-00001")
    new_serial = _serial(cert_path)
    record = reopened.registry.get("meter-00001")
    assert (record.status, record.serial) == ("active", new_serial)
    history = {
        serial: status
        for serial, status, *_ in reopened.registry.certificate_history("meter-00001")
    }
    assert history == {old_serial: "revoked", new_serial: "active"}  # the history is kept
    assert_registry_and_crl_agree(reopened)
    crl_serials = {entry.serial_number for entry in load_crl(reopened)}
    assert old_serial in crl_serials and new_serial not in crl_serials
    key_path = reopened.paths.device_key("meter-00001")
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert key_path.read_bytes() != stolen_key.read_bytes()  # a new key, not a re-issue

    async def on_the_broker() -> tuple[ConnectOutcome, ConnectOutcome, str | None, bool]:
        broker = FleetBroker(
            BrokerSettings(workspace=root, port=0, metrics_port=None, event_log=False)
        )
        await broker.start()
        port = broker.port or 0
        try:
            driver = PahoDriver()
            bystander = Device(
                _settings(
                    reopened,
                    "meter-00002",
                    reopened.paths.device_cert("meter-00002"),
                    reopened.paths.device_key("meter-00002"),
                    port,
                ),
                driver,
            )
            assert (await bystander.connect()).outcome is ConnectOutcome.CONNECTED
            replaced = Device(_settings(reopened, "meter-00001", cert_path, key_path, port), driver)
            thief = Device(
                _settings(reopened, "meter-00001", stolen_cert, stolen_key, port), driver
            )
            new = await replaced.connect()
            old = await thief.connect()
            still = replaced.connected and bystander.connected
            await replaced.close()
            await bystander.close()
            return new.outcome, old.outcome, old.detail, still
        finally:
            await broker.stop()

    new, old, detail, still = asyncio.run(on_the_broker())
    assert new is ConnectOutcome.CONNECTED
    assert (old, detail) == (ConnectOutcome.REJECTED_BY_BROKER, "certificate_revoked")
    assert still, "the thief's refusal takes nothing from the replaced device or its neighbour"


def test_replace_refuses_what_it_should_not_touch(workspace: Workspace) -> None:
    provision_devices(workspace, ProvisionSpec(count=1, prefix="meter"))
    root = workspace.paths.root
    cert = workspace.paths.device_cert("meter-00001")
    before = cert.read_bytes()

    active = _fleet("provision", "--dir", root, "--id", "meter-00001", "--replace")
    assert active.returncode == 1
    assert "device 'meter-00001' is active: only a revoked device is replaced" in active.stderr
    assert "fleet revoke meter-00001" in active.stderr
    unknown = _fleet("provision", "--dir", root, "--id", "meter-09999", "--replace")
    assert unknown.returncode == 1 and "meter-09999" in unknown.stderr
    no_id = _fleet("provision", "--dir", root, "--replace")
    assert no_id.returncode != 0 and "--replace needs --id" in no_id.stderr
    remote = _fleet("provision", "--server", "https://127.0.0.1:1", "--id", "x", "--replace")
    assert remote.returncode != 0 and "--replace works on a local workspace" in remote.stderr

    assert cert.read_bytes() == before  # nothing was touched
    history = workspace.registry.certificate_history("meter-00001")
    assert [status for _, status, *_ in history] == ["active"]


# Every system call by which a replacement changes something on disk: SQLite's commit, the
# new key and certificate written, synced and renamed into place.
_WRITES = ("pwrite64", "write", "fsync", "rename")
_MAX_CALLS = 40


@pytest.mark.slow
def test_replace_killed_at_every_write_leaves_a_consistent_fleet_and_can_be_run_again(
    workspace: Workspace,
) -> None:
    devices = iter(provision_devices(workspace, ProvisionSpec(count=100, prefix="m")).device_ids)
    root = workspace.paths.root
    kills: dict[str, int] = {}
    half_installed = 0  # kills that left the new pair written but not yet renamed
    for syscall in _WRITES:
        for nth in range(1, _MAX_CALLS + 1):
            device_id = next(devices)
            revoke_device(workspace, device_id)
            old = _serial(workspace.paths.device_cert(device_id))
            code = fleet_killed_at(
                syscall, nth, "provision", "--dir", root, "--id", device_id, "--replace"
            )
            reopened = Workspace.open(root)
            assert_registry_and_crl_agree(reopened)
            cert = reopened.paths.device_cert(device_id)
            pending = cert.with_name("cert.pem.new").exists()
            with closing(Registry(reopened.paths.db)) as registry:
                record = registry.get(device_id)
            if code == 0:
                assert (record.status, record.serial, pending) == ("active", _serial(cert), False)
                break  # this run made fewer than `nth` such calls: every one was tried
            kills[syscall] = kills.get(syscall, 0) + 1
            half_installed += pending
            done = record.status == "active" and _serial(cert) == record.serial and not pending
            if not done:  # nothing happened yet, or part of it: running it again finishes it
                assert _serial(cert) in (old, record.serial)
                replace_device(reopened, device_id)
            record = reopened.registry.get(device_id)
            assert (record.status, record.serial) == ("active", _serial(cert))
            assert old in {e.serial_number for e in load_crl(reopened)}
            assert_registry_and_crl_agree(reopened)
        else:
            pytest.fail(f"fleet provision --replace made more than {_MAX_CALLS} {syscall} calls")
    assert {"pwrite64", "rename"} <= set(kills), kills
    assert half_installed, "some kills fell between writing the new pair and installing it"

"""The broker never goes back in time: an older CRL (even genuinely signed) is refused, live and
across restarts, and a CRL written while the broker starts is not missed."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from broker import BrokerError, CrlState, FleetBroker, load_crl
from fleet import ProvisionSpec, Workspace, provision_devices, revoke_device
from fleet.kernel.files import replace_atomically
from fleet.store.revocation import publish_crl
from tests import mqtt_raw as mq
from tests.broker_support import BrokerThread, device_credentials, settings_for_tests


def _admitted(workspace: Workspace, running: BrokerThread, device_id: str) -> bool:
    creds = device_credentials(workspace, device_id)
    try:
        client = mq.RawClient(running.port, workspace.paths.root_cert, creds)
        client.send(mq.connect(device_id))
        answer = client.connack()
        client.close()
    except (OSError, EOFError):
        return False
    return answer == (0, 0)


def test_an_older_crl_is_refused_live_and_at_restart(workspace: Workspace) -> None:
    provision_devices(workspace, ProvisionSpec(count=2, prefix="dev"))
    older = workspace.paths.crl.read_bytes()  # genuinely signed, before the revocation
    revoke_device(workspace, "dev-00001")
    running = BrokerThread(settings_for_tests(workspace))
    try:
        replace_atomically(workspace.paths.crl, older)  # an old backup restored over it
        event = running.wait_for_event(lambda e: e.get("event") == "crl_rejected")
        assert "older than" in event["detail"]
        assert not _admitted(workspace, running, "dev-00001"), "still revoked"
        assert _admitted(workspace, running, "dev-00002"), "the bystander is served"
    finally:
        running.stop()
    with pytest.raises(BrokerError, match="older than #2"):
        FleetBroker(settings_for_tests(workspace))
    publish_crl(workspace)  # the fix the error names
    restarted = BrokerThread(settings_for_tests(workspace))
    try:
        assert not _admitted(workspace, restarted, "dev-00001")
        assert _admitted(workspace, restarted, "dev-00002")
    finally:
        restarted.stop()


def test_a_crl_written_while_the_broker_starts_is_loaded(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    provision_devices(workspace, ProvisionSpec(count=2, prefix="dev"))

    def read_then_revoke(path: Path, issuers: list[x509.Certificate]) -> CrlState:
        state = load_crl(path, issuers)
        revoke_device(workspace, "dev-00001")  # a new CRL lands right after the broker read
        return state

    monkeypatch.setattr("broker.revocation.load_crl", read_then_revoke)
    running = BrokerThread(settings_for_tests(workspace))
    try:
        running.wait_for_event(lambda e: e.get("event") == "crl_installed")
        assert not _admitted(workspace, running, "dev-00001")
        assert running.outcome_count("revoked") == 1
        assert _admitted(workspace, running, "dev-00002")
    finally:
        running.stop()

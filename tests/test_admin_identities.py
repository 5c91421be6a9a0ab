"""Admin identities are fleet identities: created, listed and revoked through the CLI, checked by
the admin API and the broker, and moved to the new issuer by ``fleet ca rotate``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from broker import BrokerSettings
from fleet import Workspace
from fleet.store.workspace import ADMIN_NAME
from tests import mqtt_raw as mq
from tests.broker_support import BrokerThread, Credentials
from tests.conftest import fleet_command


def _fleet(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fleet_command(*args), capture_output=True, text=True, timeout=60)


def _inventory_as(api: str, bundle: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return _fleet(
        "inventory", "--dir", tmp_path / "none", "--server", api, "--admin", bundle, "--json"
    )


def _broker_admits(workspace: Workspace, broker: BrokerThread, name: str, bundle: Path) -> bool:
    creds = Credentials(name, bundle / "cert.pem", bundle / "key.pem")
    try:
        client = mq.RawClient(broker.port, workspace.paths.root_cert, creds)
        client.send(mq.connect(f"admin:{name}"))
        answer = client.connack()
        client.close()
    except (OSError, EOFError):
        return False
    return answer == (0, 0)


def test_an_operator_is_created_listed_and_cut_off_everywhere(
    workspace: Workspace, api: str, tmp_path: Path
) -> None:
    root = workspace.paths.root
    made = _fleet("admin", "create", "alice", "--dir", root)
    assert made.returncode == 0, made.stderr
    alice = root / "admins" / "alice"
    assert (alice / "key.pem").stat().st_mode & 0o777 == 0o600
    listed = json.loads(_fleet("admin", "list", "--dir", root, "--json").stdout)["admins"]
    assert [(a["name"], a["status"]) for a in listed] == [
        ("alice", "active"),
        (ADMIN_NAME, "active"),
    ]
    assert _inventory_as(api, alice, tmp_path).returncode == 0
    broker = BrokerThread(
        BrokerSettings(workspace=root, port=0, metrics_port=None, event_log=False)
    )
    try:
        assert _broker_admits(workspace, broker, "alice", alice)

        revoked = _fleet("admin", "revoke", "alice", "--dir", root)
        assert revoked.returncode == 0 and "revoked admin alice" in revoked.stdout
        refused = _inventory_as(api, alice, tmp_path)
        assert refused.returncode != 0 and "was revoked" in refused.stderr
        broker.wait_for_event(lambda e: e.get("event") == "crl_installed")
        assert not _broker_admits(workspace, broker, "alice", alice)
        # the alert can reach the client before the broker's thread records it: wait for it
        event = broker.wait_for_event(lambda e: e.get("event") == "rejected")
        assert (event["reason"], event["device"]) == ("revoked", "alice")
        assert broker.outcome_count("revoked") == 1
        # the bystander: the control plane's own identity still works everywhere
        assert _inventory_as(api, workspace.paths.admin_dir, tmp_path).returncode == 0
        assert _broker_admits(workspace, broker, ADMIN_NAME, workspace.paths.admin_dir)
    finally:
        broker.stop()
    again = _fleet("admin", "revoke", "alice", "--dir", root)
    assert again.returncode == 0 and "already revoked" in again.stdout
    unknown = _fleet("admin", "revoke", "mallory", "--dir", root)
    assert unknown.returncode != 0 and "unknown admin 'mallory'" in unknown.stderr


def test_ca_rotation_moves_the_control_plane_and_retirement_cuts_old_bundles(
    workspace: Workspace, api: str, tmp_path: Path
) -> None:
    root = workspace.paths.root
    assert _fleet("admin", "create", "bob", "--dir", root).returncode == 0
    bob_old = tmp_path / "bob-old"
    bob_old.mkdir()
    for name in ("cert.pem", "key.pem", "root.crt"):
        (bob_old / name).write_bytes((root / "admins" / "bob" / name).read_bytes())
    assert _fleet("ca", "rotate", "--dir", root).returncode == 0
    reloaded = Workspace.open(root)
    control_plane_cert = workspace.paths.admin_cert.read_bytes()
    from cryptography import x509

    issuer = x509.load_pem_x509_certificate(control_plane_cert).issuer
    assert issuer == reloaded.ca.issuing_cert.subject, "re-issued by the new intermediate"
    assert _inventory_as(api, bob_old, tmp_path).returncode == 0, "overlap: old bundles work"
    assert _fleet("admin", "create", "bob", "--dir", root).returncode == 0  # bob's new bundle
    assert _fleet("ca", "retire", "--dir", root).returncode == 0
    refused = _inventory_as(api, bob_old, tmp_path)
    assert refused.returncode != 0 and "not trusted" in refused.stderr
    assert _inventory_as(api, root / "admins" / "bob", tmp_path).returncode == 0
    assert _inventory_as(api, workspace.paths.admin_dir, tmp_path).returncode == 0
    broker = BrokerThread(
        BrokerSettings(workspace=root, port=0, metrics_port=None, event_log=False)
    )
    try:
        assert _broker_admits(workspace, broker, ADMIN_NAME, workspace.paths.admin_dir)
        assert not _broker_admits(workspace, broker, "bob", bob_old)
    finally:
        broker.stop()

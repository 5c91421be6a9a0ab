"""Admin identities: operators (and the control plane) recorded and revocable like devices.

``fleet admin create NAME`` issues an admin certificate (OU ``role:admin``, SAN
``spiffe://<domain>/admin/<name>``) into ``DIR/admins/<name>/`` and records it; ``fleet admin
revoke NAME`` revokes every certificate of that name and publishes the CRL, so brokers refuse
it in the handshake and the admin API refuses it too (:func:`admin_certificate_problem`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fleet.kernel.identity import validate_device_id
from fleet.store.records import AdminRecord
from fleet.store.revocation import publish_crl
from fleet.store.workspace import Workspace, admin_record, issue_admin_bundle


def admin_dir(workspace: Workspace, name: str) -> Path:
    return workspace.paths.root / "admins" / name


def create_admin(
    workspace: Workspace, name: str, *, now: dt.datetime | None = None
) -> tuple[x509.Certificate, Path]:
    """Issue and record an admin certificate for ``name`` (another one if it has some)."""
    validate_device_id(name)
    directory = admin_dir(workspace, name)
    cert = issue_admin_bundle(directory, name, workspace.ca, workspace.config, now=now)
    workspace.registry.add_admin(admin_record(name, cert))
    return cert, directory


def revoke_admin(
    workspace: Workspace,
    name: str,
    *,
    reason: x509.ReasonFlags = x509.ReasonFlags.cessation_of_operation,
    now: dt.datetime | None = None,
) -> list[int]:
    """Revoke every certificate of admin ``name`` and publish the CRL; returns the serials."""
    serials = workspace.registry.revoke_admin(name, reason, now=now or dt.datetime.now(dt.UTC))
    if serials:
        publish_crl(workspace, now=now)
    return serials


def list_admins(workspace: Workspace) -> list[AdminRecord]:
    return workspace.registry.admins()


def admin_certificate_problem(workspace: Workspace, cert: x509.Certificate) -> str | None:
    """Why ``cert`` (an admin-role certificate that chained to the root) may not use the admin
    API now: its issuer is no longer trusted (retired), it was never recorded, or it was
    revoked. None: it may."""
    if not any(_issued_by(cert, path) for path in workspace.paths.trusted_issuer_certs()):
        return "its issuing CA is not trusted (retired?)"
    status = workspace.registry.admin_status(cert.serial_number)
    if status is None:
        return "it is not a recorded admin certificate ('fleet admin create')"
    if status == "revoked":
        return "it was revoked"
    return None


def _issued_by(cert: x509.Certificate, issuer_path: Path) -> bool:
    """Read from disk each time: a long-running API sees rotations made by other processes."""
    try:
        issuer = x509.load_pem_x509_certificate(issuer_path.read_bytes())
        cert.verify_directly_issued_by(issuer)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return True

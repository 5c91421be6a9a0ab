"""Devices and claims as JSON-ready dicts: what ``fleet inventory --json``, ``fleet show`` and
the admin API all print, so the three never disagree."""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509

from fleet.kernel.errors import UsageError
from fleet.store.inspect import describe_certificate
from fleet.store.records import ClaimRecord, DeviceRecord
from fleet.store.workspace import Workspace

STATUSES = ("active", "revoked", "expired", "not-yet-valid")
DEFAULT_SOON = dt.timedelta(days=7)


def device_view(
    workspace: Workspace, record: DeviceRecord, now: dt.datetime, soon: dt.timedelta = DEFAULT_SOON
) -> dict[str, Any]:
    """One device as ``fleet inventory --json`` lists it."""
    key_path = workspace.paths.device_key(record.device_id)
    return {
        "id": record.device_id,
        "serial": format(record.serial, "X"),
        "tier": record.tier,
        "env": record.env,
        "status": record.effective_status(now),
        "key_type": record.key_type,
        "not_before": record.not_before.isoformat(),
        "not_after": record.not_after.isoformat(),
        "days_left": round((record.not_after - now).total_seconds() / 86400, 2),
        "expiring_soon": record.status != "revoked" and now < record.not_after <= now + soon,
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
        "revocation_reason": record.revocation_reason,
        "cert_path": str(workspace.paths.device_cert(record.device_id)),
        "key_path": str(key_path) if record.key_source == "generated" else None,
    }


def inventory(
    workspace: Workspace,
    *,
    expiring_within: dt.timedelta | None = None,
    status: str | None = None,
    now: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """The devices (optionally only those expiring within a window, or of one status)."""
    if status is not None and status not in STATUSES:
        raise UsageError(f"invalid status {status!r}: choose one of {', '.join(STATUSES)}")
    now = now or dt.datetime.now(dt.UTC)
    soon = expiring_within or DEFAULT_SOON
    records = workspace.registry.devices(not_after_before=now + soon if expiring_within else None)
    if expiring_within:
        records = [r for r in records if r.status != "revoked" and r.not_after > now]
    if status is not None:
        records = [r for r in records if r.effective_status(now) == status]
    return [device_view(workspace, r, now, soon) for r in records]


def device_details(workspace: Workspace, device_id: str) -> dict[str, Any]:
    """``fleet show``: the record, the decoded certificate, its history and its enrollment."""
    now = dt.datetime.now(dt.UTC)
    registry = workspace.registry
    view = device_view(workspace, registry.get(device_id), now)
    cert_path = workspace.paths.device_cert(device_id)
    certificate = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    view["certificate"] = describe_certificate(certificate)
    view["history"] = [
        {
            "serial": format(serial, "X"),
            "status": status,
            "not_before": start.isoformat(),
            "not_after": end.isoformat(),
        }
        for serial, status, start, end in registry.certificate_history(device_id)
    ]
    enrollment = registry.enrollment(device_id)
    view["enrollment"] = (
        {
            "claim": enrollment.claim,
            "hardware_serial": enrollment.hardware_serial,
            "enrolled_at": enrollment.enrolled_at.isoformat(),
        }
        if enrollment
        else None
    )
    return view


def claim_status(claim: ClaimRecord, now: dt.datetime) -> str:
    """active, revoked, expired or exhausted."""
    refusal = claim.refusal(now)
    return "active" if refusal is None else refusal[0].removeprefix("claim_")


def claim_view(claim: ClaimRecord, now: dt.datetime) -> dict[str, Any]:
    return {
        "name": claim.name,
        "tier": claim.tier,
        "env": claim.env,
        "allow_ids": claim.allow_ids,
        "uses": claim.uses,
        "max_uses": claim.max_uses,
        "device_valid_for_seconds": claim.device_valid_for.total_seconds(),
        "not_after": claim.not_after.isoformat(),
        "status": claim_status(claim, now),
        "serial": format(claim.serial, "X"),
    }

"""What the registry holds, row by row: devices, claims, admins and enrollments, and the
conversions between rows and these records."""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass

from cryptography import x509


def format_time(value: dt.datetime) -> str:
    """Registry timestamps: UTC, second precision, fixed width, so text order is time order."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    """The inverse of :func:`format_time` (``fromisoformat``: strptime costs 20 times more,
    which a view of 10,000 devices, four times per row, pays in seconds)."""
    if len(text) != 20 or text[-1] != "Z":
        raise ValueError(f"registry time {text!r} is not YYYY-MM-DDTHH:MM:SSZ")
    return dt.datetime.fromisoformat(text)


def reason_flag(name: str) -> x509.ReasonFlags:
    return x509.ReasonFlags[name.replace("-", "_")]


def serial_hex(serial: int) -> str:
    return format(serial, "x")


@dataclass(frozen=True, slots=True)
class NewDevice:
    """A device about to be recorded, with the certificate it is being issued."""

    device_id: str
    serial: int
    tier: str
    env: str
    key_type: str
    key_source: str
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device as the registry holds it, with its current certificate."""

    device_id: str
    serial: int
    tier: str
    env: str
    status: str
    key_source: str
    key_type: str
    not_before: dt.datetime
    not_after: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: str | None

    def is_expired(self, now: dt.datetime) -> bool:
        return self.not_after <= now

    def effective_status(self, now: dt.datetime) -> str:
        """``revoked`` wins over ``expired``, which wins over ``not-yet-valid`` and ``active``."""
        if self.status == "revoked":
            return "revoked"
        if self.is_expired(now):
            return "expired"
        if self.not_before > now:
            return "not-yet-valid"
        return self.status


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """A claim: a certificate shared by a batch of new devices, good for enrollment only."""

    name: str
    serial: int
    tier: str  # what the devices it enrolls get
    env: str
    allow_ids: str  # shell pattern the requested device ids must match, e.g. 'sensor-*'
    max_uses: int
    uses: int
    device_valid_for: dt.timedelta  # lifetime of the certificates it leads to
    not_after: dt.datetime
    created_at: dt.datetime
    status: str = "active"
    revoked_at: dt.datetime | None = None

    def refusal(self, now: dt.datetime) -> tuple[str, str] | None:
        """Why this claim cannot enroll anyone now: (reason, message), or None."""
        if self.status == "revoked":
            return "claim_revoked", f"claim {self.name!r} was revoked"
        if self.not_after <= now:
            return "claim_expired", f"claim {self.name!r} expired at {format_time(self.not_after)}"
        if self.uses >= self.max_uses:
            return (
                "claim_exhausted",
                f"claim {self.name!r} has used all {self.max_uses} enrollments",
            )
        return None


@dataclass(frozen=True, slots=True)
class AdminRecord:
    """One admin certificate: an operator's or the control plane's (``fleet admin``)."""

    name: str
    serial: int
    issued_at: dt.datetime
    not_after: dt.datetime
    status: str = "active"


@dataclass(frozen=True, slots=True)
class Enrollment:
    """How a device joined through a claim."""

    device_id: str
    claim: str
    hardware_serial: str
    request_id: str
    enrolled_at: dt.datetime


CLAIM_COLUMNS = """
    name, serial, tier, env, allow_ids, max_uses, uses, device_valid_for, not_after, created_at,
    status, revoked_at
"""


def claim_from_row(row: sqlite3.Row) -> ClaimRecord:
    return ClaimRecord(
        name=row[0],
        serial=int(row[1], 16),
        tier=row[2],
        env=row[3],
        allow_ids=row[4],
        max_uses=int(row[5]),
        uses=int(row[6]),
        device_valid_for=dt.timedelta(seconds=float(row[7])),
        not_after=parse_time(row[8]),
        created_at=parse_time(row[9]),
        status=row[10],
        revoked_at=parse_time(row[11]) if row[11] else None,
    )


DEVICE_COLUMNS = """
    d.id, c.serial, d.tier, d.env, d.status, d.key_source, c.key_type, c.not_before, c.not_after,
    d.created_at, d.updated_at, c.revoked_at, c.revocation_reason
"""


def device_from_row(row: sqlite3.Row) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        serial=int(row[1], 16),
        tier=row[2],
        env=row[3],
        status=row[4],
        key_source=row[5],
        key_type=row[6],
        not_before=parse_time(row[7]),
        not_after=parse_time(row[8]),
        created_at=parse_time(row[9]),
        updated_at=parse_time(row[10]),
        revoked_at=parse_time(row[11]) if row[11] else None,
        revocation_reason=row[12],
    )

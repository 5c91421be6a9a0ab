"""The fleet as the dashboard shows it, read from the workspace: inventory by state, tier,
environment and issuing CA (with search), the certificate expiry timeline, and the revocation
panel (the CRL in force and how fast recent revocations cut their devices off)."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from fleet.kernel.errors import UsageError
from fleet.store.records import DeviceRecord
from fleet.store.revocation import load_crl
from fleet.store.workspace import Workspace

EXPIRY_BUCKETS = {
    "1h": dt.timedelta(hours=1),
    "1d": dt.timedelta(days=1),
    "7d": dt.timedelta(days=7),
    "30d": dt.timedelta(days=30),
}
TIMELINE_DAYS = 60  # at least; longer to the last expiry, up to MAX_TIMELINE_DAYS
MAX_TIMELINE_DAYS = 800
MAX_QUERY = 64
MAX_ROWS = 500
RECENT_REVOCATIONS = 10
_UNKNOWN_ISSUER = "unknown (certificate file missing)"


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """A search of the inventory: ``text`` in the id, and exact state, tier, env, issuer."""

    text: str = ""
    state: str | None = None
    tier: str | None = None
    env: str | None = None
    issuer: str | None = None
    limit: int = 100

    @classmethod
    def from_params(cls, params: dict[str, str]) -> DeviceQuery:
        """From URL parameters (untrusted): bounded lengths and limit, else UsageError."""
        for name, value in params.items():
            if name not in {"q", "state", "tier", "env", "issuer", "limit"}:
                raise UsageError(f"unknown parameter {name[:40]!r}")
            if len(value) > (256 if name == "issuer" else MAX_QUERY):
                raise UsageError(f"parameter {name!r} is too long")
        limit_text = params.get("limit", "100")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_ROWS:
            raise UsageError(f"limit: a whole number from 1 to {MAX_ROWS}")
        return cls(
            text=params.get("q", "").strip().lower(),
            state=params.get("state") or None,
            tier=params.get("tier") or None,
            env=params.get("env") or None,
            issuer=params.get("issuer") or None,
            limit=int(limit_text),
        )


class FleetView:
    """Reads the workspace on each call (the registry is the truth); issuers are cached by
    serial, since reading them means opening each device's certificate once."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self._issuers: dict[int, str] = {}
        self._lock = threading.Lock()

    def _issuer(self, record: DeviceRecord) -> str:
        with self._lock:
            known = self._issuers.get(record.serial)
        if known is not None:
            return known
        try:
            pem = self.workspace.paths.device_cert(record.device_id).read_bytes()
            cert = x509.load_pem_x509_certificate(pem)
            issuer = cert.issuer.rfc4514_string() if cert.serial_number == record.serial else None
        except (OSError, ValueError):
            issuer = None
        if issuer is None:
            return _UNKNOWN_ISSUER  # not cached: the file may be written in a moment
        with self._lock:
            self._issuers[record.serial] = issuer
        return issuer

    def devices(self) -> list[DeviceRecord]:
        """Every device, read once per snapshot and handed to the views below."""
        return self.workspace.registry.devices()

    def _rows(self, records: list[DeviceRecord], now: dt.datetime) -> list[dict[str, Any]]:
        return [
            {
                "id": r.device_id,
                "state": r.effective_status(now),
                "tier": r.tier,
                "env": r.env,
                "issuer": self._issuer(r),
                "serial": format(r.serial, "X"),
                "not_after": r.not_after.isoformat(),
                "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
            }
            for r in records
        ]

    def inventory(
        self,
        query: DeviceQuery,
        records: list[DeviceRecord] | None = None,
        *,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Counts of the whole fleet by state, tier, env and issuer, and the matching rows."""
        records = self.devices() if records is None else records
        rows = self._rows(records, now or dt.datetime.now(dt.UTC))
        matching = [
            row
            for row in rows
            if query.text in row["id"]
            and all(
                wanted is None or row[field] == wanted
                for field, wanted in (
                    ("state", query.state),
                    ("tier", query.tier),
                    ("env", query.env),
                    ("issuer", query.issuer),
                )
            )
        ]
        return {
            "total": len(rows),
            "by_state": _counts(row["state"] for row in rows),
            "by_tier": _counts(row["tier"] for row in rows),
            "by_env": _counts(row["env"] for row in rows),
            "by_issuer": _counts(row["issuer"] for row in rows),
            "matching": len(matching),
            "devices": matching[: query.limit],
        }

    def expiry(
        self, records: list[DeviceRecord] | None = None, *, now: dt.datetime | None = None
    ) -> dict[str, Any]:
        """Devices (revoked ones left out) by the day their certificate expires, from today
        to the last expiry (at least ``TIMELINE_DAYS``, at most ``MAX_TIMELINE_DAYS`` days;
        ``later`` counts those beyond), and how many expire within 1h/1d/7d/30d or have
        expired."""
        now = now or dt.datetime.now(dt.UTC)
        records = self.devices() if records is None else records
        live = [r for r in records if r.status != "revoked"]
        today = now.date()
        last = max((r.not_after.date() for r in live), default=today)
        span = min(max(TIMELINE_DAYS, (last - today).days + 1), MAX_TIMELINE_DAYS)
        per_day: Counter[str] = Counter()
        later = 0
        for record in live:
            day = record.not_after.date()
            if record.not_after <= now:
                continue
            if (day - today).days < span:
                per_day[day.isoformat()] += 1
            else:
                later += 1
        days = [(today + dt.timedelta(days=i)).isoformat() for i in range(span)]
        within = {
            label: sum(1 for r in live if now < r.not_after <= now + window)
            for label, window in EXPIRY_BUCKETS.items()
        }
        return {
            "days": days,
            "counts": [per_day[day] for day in days],
            "later": later,
            "expired": sum(1 for r in live if r.not_after <= now),
            "within": within,
        }

    def revocation(
        self,
        cut_times: dict[str, dt.datetime],
        records: list[DeviceRecord] | None = None,
        *,
        now: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """The CRL in force and the latest revocations, each with the time from ``fleet revoke``
        to the broker cutting the session (None: no cut seen, e.g. it was not connected)."""
        now = now or dt.datetime.now(dt.UTC)
        crl = load_crl(self.workspace)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        if records is None:
            revoked = self.workspace.registry.devices(status="revoked")
        else:
            revoked = [r for r in records if r.status == "revoked"]
        latest = sorted(
            (r for r in revoked if r.revoked_at is not None),
            key=lambda r: r.revoked_at or now,
            reverse=True,
        )[:RECENT_REVOCATIONS]
        recent = []
        for record in latest:
            assert record.revoked_at is not None
            cut = cut_times.get(record.device_id)
            latency = (cut - record.revoked_at).total_seconds() if cut else None
            recent.append(
                {
                    "id": record.device_id,
                    "revoked_at": record.revoked_at.isoformat(),
                    "reason": record.revocation_reason,
                    "cut_after_seconds": round(latency, 3) if latency is not None else None,
                }
            )
        next_update = crl.next_update_utc
        return {
            "crl_number": number,
            "this_update": crl.last_update_utc.isoformat(),
            "age_seconds": round((now - crl.last_update_utc).total_seconds(), 1),
            "next_update": next_update.isoformat() if next_update else None,
            "stale": bool(next_update and next_update <= now),
            "revoked_devices": len(revoked),
            "recent": recent,
        }


def _counts(values: Any) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))

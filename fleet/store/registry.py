"""The device registry: one SQLite database (WAL), every change in one transaction.

Devices and their certificates are separate tables so a device can hold a history of
certificates (rotation, renewal). A device row is ``pending`` while a provisioning run writes its
files and becomes ``active`` in the same transaction as the rest of its batch; readers never see
pending rows, and an interrupted batch is deleted with its files (see :mod:`fleet.store.provisioning`).
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509

from fleet.kernel.errors import (
    NameTakenError,
    RegistryError,
    RequestRefused,
    UnknownClaimError,
    UnknownDeviceError,
    WorkspaceError,
)
from fleet.store.ca import RevokedEntry
from fleet.store.records import (
    CLAIM_COLUMNS,
    DEVICE_COLUMNS,
    AdminRecord,
    ClaimRecord,
    DeviceRecord,
    Enrollment,
    NewDevice,
    claim_from_row,
    device_from_row,
    format_time,
    parse_time,
    reason_flag,
    serial_hex,
)
from fleet.store.registry_schema import SCHEMA, SCHEMA_VERSION


class Registry:
    """Access to ``fleet.db``, safe to share between threads; SQLite serialises writers."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        if not create and not path.exists():
            raise WorkspaceError(
                f"{path}: registry missing; run 'fleet init' to create the workspace"
            )
        self.path = path
        # One connection shared by the threads of this process, one at a time (the lock);
        # other processes are kept apart by SQLite's own locking.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            path, isolation_level=None, timeout=30.0, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        if create or self._schema_version() < SCHEMA_VERSION:
            self._create_schema()

    def _schema_version(self) -> int:
        rows = self._query("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(rows[0][0]) if rows else 0

    def _create_schema(self) -> None:
        """Create what is missing (every statement is IF NOT EXISTS): a new registry, or one
        written by an older version, gains the newer tables in one transaction."""
        with self.transaction():
            # executescript() would COMMIT first: run the statements one by one instead.
            for statement in filter(str.strip, SCHEMA.split(";")):
                self._db.execute(statement)
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolls back on any exception, Ctrl-C included."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: Iterable[object] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    # -- meta -------------------------------------------------------------------------------

    def next_crl_number(self) -> int:
        """Increment and return the CRL number (RFC 5280: monotonically increasing)."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone()
            number = int(row[0]) + 1 if row else 1
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('crl_number', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(number),),
            )
        return number

    # -- revocation bookkeeping: the CRL on disk must cover every committed revocation ------

    @staticmethod
    def _count_revocation(db: sqlite3.Connection) -> None:
        """Called in every transaction that revokes: one more revocation to publish."""
        db.execute(
            "INSERT INTO meta(key, value) VALUES ('revocations', '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )

    def revocation_snapshot(self) -> tuple[int, list[RevokedEntry], list[RevokedEntry]]:
        """(revocations counted so far, every revoked end-entity certificate, every revoked
        issuing CA), read in one transaction."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'revocations'").fetchone()
            issuers = [
                RevokedEntry(int(serial, 16), parse_time(at), reason_flag(reason))
                for serial, at, reason in db.execute(
                    "SELECT serial, revoked_at, revocation_reason FROM issuer_revocations "
                    "ORDER BY revoked_at, serial"
                )
            ]
            return (int(row[0]) if row else 0), self._revoked_entries(db), issuers

    def revoke_issuer(
        self, serial: int, subject: str, reason: x509.ReasonFlags, *, now: dt.datetime
    ) -> bool:
        """Record an issuing CA as revoked (for the root's CRL); False when it already was."""
        with self.transaction() as db:
            inserted = db.execute(
                "INSERT INTO issuer_revocations(serial, subject, revoked_at, revocation_reason) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(serial) DO NOTHING",
                (serial_hex(serial), subject, format_time(now), reason.name.replace("_", "-")),
            ).rowcount
            if inserted:
                self._count_revocation(db)
        return bool(inserted)

    def crl_published(self, revocations: int) -> None:
        """Record that a CRL covering the first ``revocations`` revocations is on disk."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('crl_covers', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = "
                "MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                (str(revocations),),
            )

    def crl_publication_pending(self) -> bool:
        """Whether a revocation was committed that no CRL on disk carries yet (a publisher
        died between the two, or is about to publish)."""
        rows = dict(
            self._query("SELECT key, value FROM meta WHERE key IN ('revocations', 'crl_covers')")
        )
        return int(rows.get("revocations", 0)) > int(rows.get("crl_covers", 0))

    # -- provisioning -----------------------------------------------------------------------

    def next_sequence(self, prefix: str) -> int:
        """One more than the highest ``<prefix>-<number>`` id in use (1 for a new prefix)."""
        pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)$")
        rows = self._query(
            "SELECT id FROM devices WHERE id >= ? AND id < ?", (f"{prefix}-", f"{prefix}.")
        )
        numbers = [int(m.group(1)) for (device_id,) in rows if (m := pattern.fullmatch(device_id))]
        return max(numbers, default=0) + 1

    def taken_ids(self, device_ids: Iterable[str]) -> set[str]:
        ids = list(device_ids)
        taken: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._query(f"SELECT id FROM devices WHERE id IN ({marks})", chunk)
            taken.update(row[0] for row in rows)
        return taken

    def add_pending(self, batch_id: str, devices: Iterable[NewDevice], *, now: dt.datetime) -> None:
        """Record a batch as pending, in one transaction, before any of its files exist."""
        stamp = format_time(now)
        formatted: dict[dt.datetime, str] = {}  # a batch shares its validity: format it once

        def fmt(value: dt.datetime) -> str:
            if value not in formatted:
                formatted[value] = format_time(value)
            return formatted[value]

        device_rows = []
        certificate_rows = []
        for d in devices:
            serial = serial_hex(d.serial)
            device_rows.append(
                (d.device_id, d.tier, d.env, d.key_source, serial, batch_id, stamp, stamp)
            )
            certificate_rows.append(
                (serial, d.device_id, d.key_type, fmt(d.not_before), fmt(d.not_after), stamp)
            )
        try:
            with self.transaction() as db:
                db.executemany(
                    "INSERT INTO devices(id, tier, env, status, key_source, serial, batch_id, "
                    "created_at, updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                    device_rows,
                )
                db.executemany(
                    "INSERT INTO certificates(serial, device_id, key_type, not_before, not_after, "
                    "status, issued_at) VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                    certificate_rows,
                )
        except sqlite3.IntegrityError as exc:
            raise RegistryError(
                f"cannot record the new devices: {exc}; the registry is unchanged"
            ) from exc

    def activate_batch(self, batch_id: str) -> int:
        """Make a pending batch visible, in one transaction. Returns the number of devices."""
        with self.transaction() as db:
            return self._activate(db, batch_id)

    @staticmethod
    def _activate(db: sqlite3.Connection, batch_id: str) -> int:
        db.execute(
            "UPDATE certificates SET status = 'active' WHERE status = 'pending' AND device_id IN "
            "(SELECT id FROM devices WHERE batch_id = ? AND status = 'pending')",
            (batch_id,),
        )
        cursor = db.execute(
            "UPDATE devices SET status = 'active', batch_id = NULL "
            "WHERE batch_id = ? AND status = 'pending'",
            (batch_id,),
        )
        return cursor.rowcount

    def pending_batches(self) -> dict[str, list[str]]:
        """Batches whose provisioning run did not finish: batch id -> device ids."""
        batches: dict[str, list[str]] = {}
        for batch_id, device_id in self._query(
            "SELECT batch_id, id FROM devices WHERE status = 'pending' ORDER BY id"
        ):
            batches.setdefault(batch_id, []).append(device_id)
        return batches

    def delete_batch(self, batch_id: str) -> int:
        """Forget a pending batch (its certificates go with it, by cascade)."""
        with self.transaction() as db:
            cursor = db.execute(
                "DELETE FROM devices WHERE batch_id = ? AND status = 'pending'", (batch_id,)
            )
            return cursor.rowcount

    # -- queries ----------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceRecord:
        rows = self._query(
            f"SELECT {DEVICE_COLUMNS} FROM devices d JOIN certificates c ON c.serial = d.serial "
            "WHERE d.id = ? AND d.status != 'pending'",
            (device_id,),
        )
        if not rows:
            raise UnknownDeviceError(device_id)
        return device_from_row(rows[0])

    def devices(
        self,
        *,
        status: str | None = None,
        not_after_before: dt.datetime | None = None,
    ) -> list[DeviceRecord]:
        """Every visible device in id order, optionally filtered by stored status or expiry."""
        clauses = ["d.status != 'pending'"]
        params: list[str] = []
        if status is not None:
            clauses.append("d.status = ?")
            params.append(status)
        if not_after_before is not None:
            clauses.append("c.not_after <= ?")
            params.append(format_time(not_after_before))
        rows = self._query(
            f"SELECT {DEVICE_COLUMNS} FROM devices d JOIN certificates c ON c.serial = d.serial "
            f"WHERE {' AND '.join(clauses)} ORDER BY d.id",
            params,
        )
        return [device_from_row(row) for row in rows]

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM devices WHERE status != 'pending'")[0][0])

    # -- revocation -------------------------------------------------------------------------

    def revoke(self, device_id: str, reason: x509.ReasonFlags, *, now: dt.datetime) -> list[int]:
        """Revoke every unrevoked certificate of ``device_id`` and mark the device revoked.

        Returns the serials revoked now: empty when the device was already revoked.
        """
        return self._revoke(device_id, ("active", "superseded"), reason, now, device_too=True)

    def revoke_superseded(
        self, device_id: str, reason: x509.ReasonFlags, *, now: dt.datetime
    ) -> list[int]:
        """Revoke only the superseded certificates of ``device_id`` (after a renewal).

        The device and its current certificate stay active. Returns the serials revoked now.
        """
        return self._revoke(device_id, ("superseded",), reason, now, device_too=False)

    def _revoke(
        self,
        device_id: str,
        statuses: tuple[str, ...],
        reason: x509.ReasonFlags,
        now: dt.datetime,
        *,
        device_too: bool,
    ) -> list[int]:
        stamp = format_time(now)
        reason_name = reason.name.replace("_", "-")
        marks = ",".join("?" * len(statuses))
        with self.transaction() as db:
            row = db.execute(
                "SELECT status FROM devices WHERE id = ? AND status != 'pending'", (device_id,)
            ).fetchone()
            if row is None:
                raise UnknownDeviceError(device_id)
            serials = [
                r[0]
                for r in db.execute(
                    f"SELECT serial FROM certificates WHERE device_id = ? AND status IN ({marks})",
                    (device_id, *statuses),
                )
            ]
            db.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
                f"WHERE device_id = ? AND status IN ({marks})",
                (stamp, reason_name, device_id, *statuses),
            )
            if device_too:
                db.execute(
                    "UPDATE devices SET status = 'revoked', updated_at = ? "
                    "WHERE id = ? AND status != 'revoked'",
                    (stamp, device_id),
                )
            if serials:
                self._count_revocation(db)
        return [int(serial, 16) for serial in serials]

    # -- renewal ----------------------------------------------------------------------------

    def request_seen(self, kind: str, request_id: str) -> bool:
        """Whether a request id of ``kind`` (provision or renew) was answered with a certificate."""
        table = "enrollments" if kind == "provision" else "renewal_requests"
        rows = self._query(f"SELECT 1 FROM {table} WHERE request_id = ?", (request_id,))
        return bool(rows)

    def renew(self, renewal: NewDevice, *, now: dt.datetime, request_id: str | None = None) -> int:
        """Record ``renewal`` as the device's current certificate; the old one is superseded.

        One transaction: the registry knows the new serial before any file holds it, so a
        crash can leave an unused certificate on record, never an unrecorded one in use.
        Returns the superseded serial.
        """
        stamp = format_time(now)
        with self.transaction() as db:
            row = db.execute(
                "SELECT status, serial FROM devices WHERE id = ? AND status != 'pending'",
                (renewal.device_id,),
            ).fetchone()
            if row is None:
                raise UnknownDeviceError(renewal.device_id)
            if row[0] == "revoked":
                raise RegistryError(
                    f"device {renewal.device_id!r} is revoked; provision a new device instead"
                )
            db.execute(
                "INSERT INTO certificates(serial, device_id, key_type, not_before, not_after, "
                "status, issued_at) VALUES (?, ?, ?, ?, ?, 'active', ?)",
                (
                    serial_hex(renewal.serial),
                    renewal.device_id,
                    renewal.key_type,
                    format_time(renewal.not_before),
                    format_time(renewal.not_after),
                    stamp,
                ),
            )
            db.execute("UPDATE certificates SET status = 'superseded' WHERE serial = ?", (row[1],))
            if request_id is not None:  # a renewal over MQTT: its id is never answered twice
                db.execute(
                    "INSERT INTO renewal_requests(request_id, device_id, serial, answered_at) "
                    "VALUES (?, ?, ?, ?)",
                    (request_id, renewal.device_id, serial_hex(renewal.serial), stamp),
                )
            db.execute(
                "UPDATE devices SET serial = ?, updated_at = ? WHERE id = ?",
                (serial_hex(renewal.serial), stamp, renewal.device_id),
            )
        return int(row[1], 16)

    def replace(
        self, replacement: NewDevice, *, now: dt.datetime, unheld_serial: int | None = None
    ) -> list[int]:
        """Record a new key and certificate for a revoked device: it is active again under the
        same id, with ``replacement`` as its current certificate; its revoked certificates stay
        on record (and on the CRL). Returns its revoked serials.

        ``unheld_serial``: the device is active under this serial only because a replacement
        was interrupted before its files were installed (its key died with the process): that
        certificate is superseded and replaced in turn.

        One transaction, before any file holds the new certificate (as :meth:`renew`).
        """
        stamp = format_time(now)
        with self.transaction() as db:
            row = db.execute(
                "SELECT status, serial FROM devices WHERE id = ? AND status != 'pending'",
                (replacement.device_id,),
            ).fetchone()
            if row is None:
                raise UnknownDeviceError(replacement.device_id)
            interrupted = unheld_serial is not None and row[1] == serial_hex(unheld_serial)
            if interrupted:
                db.execute(
                    "UPDATE certificates SET status = 'superseded' WHERE serial = ?", (row[1],)
                )
            elif row[0] != "revoked":
                raise RegistryError(
                    f"device {replacement.device_id!r} is {row[0]}: only a revoked device is "
                    f"replaced (run 'fleet revoke {replacement.device_id}' first)"
                )
            before = [
                int(r[0], 16)
                for r in db.execute(
                    "SELECT serial FROM certificates WHERE device_id = ? AND status = 'revoked'",
                    (replacement.device_id,),
                )
            ]
            db.execute(
                "INSERT INTO certificates(serial, device_id, key_type, not_before, not_after, "
                "status, issued_at) VALUES (?, ?, ?, ?, ?, 'active', ?)",
                (
                    serial_hex(replacement.serial),
                    replacement.device_id,
                    replacement.key_type,
                    format_time(replacement.not_before),
                    format_time(replacement.not_after),
                    stamp,
                ),
            )
            db.execute(
                "UPDATE devices SET status = 'active', serial = ?, key_source = ?, "
                "updated_at = ? WHERE id = ?",
                (
                    serial_hex(replacement.serial),
                    replacement.key_source,
                    stamp,
                    replacement.device_id,
                ),
            )
        return before

    def certificate_history(
        self, device_id: str
    ) -> list[tuple[int, str, dt.datetime, dt.datetime]]:
        """Every certificate the device has held, oldest first: (serial, status, not_before, not_after)."""
        rows = self._query(
            "SELECT serial, status, not_before, not_after FROM certificates "
            "WHERE device_id = ? ORDER BY issued_at, not_before",
            (device_id,),
        )
        return [(int(r[0], 16), r[1], parse_time(r[2]), parse_time(r[3])) for r in rows]

    def certificate_status(self, serial: int) -> tuple[str, RevokedEntry | None] | None:
        """The status of the certificate ``serial`` (None: never issued by this fleet).

        ``pending`` certificates (a provisioning run still writing) count as never issued.
        """
        rows = self._query(
            "SELECT status, revoked_at, revocation_reason FROM certificates WHERE serial = ? "
            "UNION ALL SELECT status, revoked_at, revocation_reason FROM claims WHERE serial = ?",
            (serial_hex(serial), serial_hex(serial)),
        )
        if not rows or rows[0][0] == "pending":
            return None
        status, revoked_at, reason = rows[0]
        if status != "revoked":
            return status, None
        entry = RevokedEntry(
            serial, parse_time(revoked_at), x509.ReasonFlags[reason.replace("-", "_")]
        )
        return status, entry

    def revoked_entries(self) -> list[RevokedEntry]:
        """Every revoked certificate (devices' and claims'), for the CRL."""
        with self._lock:
            return self._revoked_entries(self._db)

    @staticmethod
    def _revoked_entries(db: sqlite3.Connection) -> list[RevokedEntry]:
        rows = db.execute(
            "SELECT serial, revoked_at, revocation_reason FROM certificates "
            "WHERE status = 'revoked' UNION ALL "
            "SELECT serial, revoked_at, revocation_reason FROM claims WHERE status = 'revoked' "
            "UNION ALL "
            "SELECT serial, revoked_at, revocation_reason FROM admins WHERE status = 'revoked' "
            "ORDER BY revoked_at, serial"
        ).fetchall()
        return [
            RevokedEntry(
                serial=int(serial, 16),
                revoked_at=parse_time(revoked_at),
                reason=reason_flag(reason),
            )
            for serial, revoked_at, reason in rows
        ]

    # -- claims and enrollment --------------------------------------------------------------

    def add_claim(self, claim: ClaimRecord) -> None:
        """Record a new claim; a name in use is refused (revoked claims keep their name)."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM claims WHERE name = ?", (claim.name,)).fetchone():
                raise NameTakenError(
                    f"claim {claim.name!r} already exists; choose another --name "
                    "('fleet claim list' shows them)",
                    field="name",
                )
            db.execute(
                "INSERT INTO claims(name, serial, tier, env, allow_ids, max_uses, uses, "
                "device_valid_for, not_after, created_at, status) "
                "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, 'active')",
                (
                    claim.name,
                    serial_hex(claim.serial),
                    claim.tier,
                    claim.env,
                    claim.allow_ids,
                    claim.max_uses,
                    claim.device_valid_for.total_seconds(),
                    format_time(claim.not_after),
                    format_time(claim.created_at),
                ),
            )

    def claims(self) -> list[ClaimRecord]:
        return [
            claim_from_row(row)
            for row in self._query(f"SELECT {CLAIM_COLUMNS} FROM claims ORDER BY name")
        ]

    def claim(self, name: str) -> ClaimRecord:
        rows = self._query(f"SELECT {CLAIM_COLUMNS} FROM claims WHERE name = ?", (name,))
        if not rows:
            raise UnknownClaimError(name)
        return claim_from_row(rows[0])

    def claim_by_serial(self, serial: int) -> ClaimRecord | None:
        rows = self._query(
            f"SELECT {CLAIM_COLUMNS} FROM claims WHERE serial = ?", (serial_hex(serial),)
        )
        return claim_from_row(rows[0]) if rows else None

    def revoke_claim(self, name: str, reason: x509.ReasonFlags, *, now: dt.datetime) -> bool:
        """Revoke a claim (no more enrollments; its certificate goes on the CRL).

        Devices it enrolled are unaffected. False when it was already revoked.
        """
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM claims WHERE name = ?", (name,)).fetchone():
                raise UnknownClaimError(name)
            cursor = db.execute(
                "UPDATE claims SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
                "WHERE name = ? AND status = 'active'",
                (format_time(now), reason.name.replace("_", "-"), name),
            )
            if cursor.rowcount == 1:
                self._count_revocation(db)
            return cursor.rowcount == 1

    # -- admin identities -------------------------------------------------------------------

    def add_admin(self, admin: AdminRecord) -> None:
        """Record an admin certificate (recording the same serial again changes nothing)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO admins(serial, name, issued_at, not_after, status) "
                "VALUES (?, ?, ?, ?, 'active') ON CONFLICT(serial) DO NOTHING",
                (
                    serial_hex(admin.serial),
                    admin.name,
                    format_time(admin.issued_at),
                    format_time(admin.not_after),
                ),
            )

    def admins(self) -> list[AdminRecord]:
        rows = self._query(
            "SELECT serial, name, issued_at, not_after, status FROM admins "
            "ORDER BY name, issued_at, serial"
        )
        return [
            AdminRecord(r[1], int(r[0], 16), parse_time(r[2]), parse_time(r[3]), r[4]) for r in rows
        ]

    def admin_status(self, serial: int) -> str | None:
        """``active``, ``revoked``, or None for a serial never recorded as an admin's."""
        rows = self._query("SELECT status FROM admins WHERE serial = ?", (serial_hex(serial),))
        return str(rows[0][0]) if rows else None

    def revoke_admin(self, name: str, reason: x509.ReasonFlags, *, now: dt.datetime) -> list[int]:
        """Revoke every active certificate of admin ``name``; returns their serials."""
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM admins WHERE name = ?", (name,)).fetchone():
                raise RegistryError(f"unknown admin {name!r}: 'fleet admin list' shows the admins")
            serials = [
                r[0]
                for r in db.execute(
                    "SELECT serial FROM admins WHERE name = ? AND status = 'active'", (name,)
                )
            ]
            db.execute(
                "UPDATE admins SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
                "WHERE name = ? AND status = 'active'",
                (format_time(now), reason.name.replace("_", "-"), name),
            )
            if serials:
                self._count_revocation(db)
        return [int(serial, 16) for serial in serials]

    def activate_enrollment(self, batch_id: str, enrollment: Enrollment) -> None:
        """Make an enrolled device visible and spend one use of its claim, in one transaction.

        Raises :class:`RequestRefused` (and changes nothing) when the claim was revoked or
        used up meanwhile: two requests racing for the last use cannot both win.
        """
        with self.transaction() as db:
            spent = db.execute(
                "UPDATE claims SET uses = uses + 1 "
                "WHERE name = ? AND status = 'active' AND uses < max_uses",
                (enrollment.claim,),
            )
            if spent.rowcount != 1:
                raise RequestRefused(
                    "claim_exhausted", f"claim {enrollment.claim!r} has no uses left or was revoked"
                )
            db.execute(
                "INSERT INTO enrollments(device_id, claim, hardware_serial, request_id, enrolled_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    enrollment.device_id,
                    enrollment.claim,
                    enrollment.hardware_serial,
                    enrollment.request_id,
                    format_time(enrollment.enrolled_at),
                ),
            )
            self._activate(db, batch_id)

    def enrollment(self, device_id: str) -> Enrollment | None:
        rows = self._query(
            "SELECT device_id, claim, hardware_serial, request_id, enrolled_at FROM enrollments "
            "WHERE device_id = ?",
            (device_id,),
        )
        if not rows:
            return None
        row = rows[0]
        return Enrollment(row[0], row[1], row[2], row[3], parse_time(row[4]))

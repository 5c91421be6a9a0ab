"""Replacement: a revoked device gets a new key and certificate under the same id.

For a device whose key was compromised or lost (revoked first, so the old certificate is on the
CRL): the registry records the new certificate and makes the device active again in one
transaction, keeping every certificate it held before (still revoked); then the new key and
certificate are installed as a pair (see :mod:`fleet.kernel.identity_files`). A crash between the two
leaves the device active under a certificate nobody holds (its key died with the process) and
the old, revoked pair on disk; registry and CRL agree, and replacing it again finishes the job.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fleet.kernel.identity import validate_device_id
from fleet.kernel.identity_files import install_identity, recover_identity
from fleet.kernel.keys import KeyType, generate_private_key, private_key_pem
from fleet.store.records import NewDevice
from fleet.store.workspace import Workspace


@dataclass(frozen=True, slots=True)
class ReplacementResult:
    device_id: str
    serial: int
    previous_serials: tuple[int, ...]  # the revoked certificates it held before
    not_before: dt.datetime
    not_after: dt.datetime


def replace_device(
    workspace: Workspace,
    device_id: str,
    *,
    valid_for: dt.timedelta | None = None,
    key_type: KeyType | None = None,
    now: dt.datetime | None = None,
) -> ReplacementResult:
    """Give the revoked ``device_id`` a new key and certificate (same tier and env)."""
    validate_device_id(device_id)
    now = now or dt.datetime.now(dt.UTC)
    not_before = now.replace(microsecond=0)
    not_after = not_before + (valid_for or workspace.config.device_valid_for)
    key_type = key_type or workspace.config.key_type
    key = generate_private_key(key_type)
    with workspace.lock("provision"):
        record = workspace.registry.get(device_id)
        cert_path = workspace.paths.device_cert(device_id)
        key_path = workspace.paths.device_key(device_id)
        finished = recover_identity(cert_path, key_path)  # a pair a crash left half-installed
        held = _serial_on_disk(cert_path)
        if finished and record.status == "active" and held == record.serial:
            # the replacement this command is re-run for had done everything but the renames
            revoked = workspace.registry.certificate_history(device_id)
            return ReplacementResult(
                device_id,
                record.serial,
                tuple(serial for serial, status, *_ in revoked if status == "revoked"),
                record.not_before,
                record.not_after,
            )
        unheld = record.serial if record.status == "active" and held != record.serial else None
        identity = workspace.identity_of(record)
        ca = workspace.ca
        serial = x509.random_serial_number()
        cert = ca.issue_device(
            identity, key.public_key(), not_before=not_before, not_after=not_after, serial=serial
        )
        previous = workspace.registry.replace(
            NewDevice(
                device_id=device_id,
                serial=serial,
                tier=record.tier,
                env=record.env,
                key_type=key_type.value,
                key_source="generated",
                not_before=not_before,
                not_after=not_after,
            ),
            now=now,
            unheld_serial=unheld,
        )
        install_identity(cert_path, key_path, ca.chain_pem(cert), private_key_pem(key))
    return ReplacementResult(device_id, serial, tuple(previous), not_before, not_after)


def _serial_on_disk(cert_path: Path) -> int | None:
    try:
        return x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    except (OSError, ValueError):
        return None

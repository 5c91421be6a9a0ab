"""Renewal: a fresh certificate for a device's existing key, the old one kept until it expires.

The registry records the new certificate first (the old one becomes *superseded*), then
``cert.pem`` is replaced atomically. Devices pick the new file up at their next handshake; the
old certificate stays valid (overlap, no downtime) until it expires or is revoked with
:func:`fleet.store.revocation.revoke_superseded`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509

from fleet.kernel.errors import CertificateError
from fleet.kernel.files import replace_atomically
from fleet.kernel.keys import PublicKey, key_type_of
from fleet.store.records import NewDevice
from fleet.store.workspace import Workspace


@dataclass(frozen=True, slots=True)
class RenewalResult:
    device_id: str
    serial: int
    superseded_serial: int
    not_before: dt.datetime
    not_after: dt.datetime


def renew_device(
    workspace: Workspace,
    device_id: str,
    *,
    valid_for: dt.timedelta | None = None,
    now: dt.datetime | None = None,
) -> RenewalResult:
    """Issue ``device_id`` a new certificate for the key it already holds and install it."""
    record = workspace.registry.get(device_id)
    cert_path = workspace.paths.device_cert(device_id)
    try:
        current = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(
            f"cannot read the current certificate {cert_path} ({exc})", device_id=device_id
        ) from exc
    public_key = current.public_key()
    if not isinstance(public_key, PublicKey):
        raise CertificateError("unsupported key algorithm", device_id=device_id)
    now = now or dt.datetime.now(dt.UTC)
    not_before = now.replace(microsecond=0)
    not_after = not_before + (valid_for or workspace.config.device_valid_for)
    identity = workspace.identity_of(record)
    ca = workspace.ca
    cert = ca.issue_device(identity, public_key, not_before=not_before, not_after=not_after)
    superseded = workspace.registry.renew(
        NewDevice(
            device_id=device_id,
            serial=cert.serial_number,
            tier=record.tier,
            env=record.env,
            key_type=key_type_of(public_key).value,
            key_source=record.key_source,
            not_before=not_before,
            not_after=not_after,
        ),
        now=now,
    )
    replace_atomically(cert_path, ca.chain_pem(cert))
    return RenewalResult(device_id, cert.serial_number, superseded, not_before, not_after)

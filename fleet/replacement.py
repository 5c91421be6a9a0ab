"""Replacement: a revoked device gets a new key and certificate under the same id.

For a device whose key was compromised or lost (revoked first, so the old certificate is on the
CRL): the registry records the new certificate and makes the device active again in one
transaction, keeping every certificate it held before (still revoked); then the new key and
certificate are installed as a pair (see :mod:`device.identity_files`). A crash between the two
leaves the device active under a certificate nobody holds and the old, revoked pair on disk:
revoke it again and replace it again, and registry and CRL still agree.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509

from device.identity_files import install_identity
from fleet.identity import DeviceIdentity, validate_device_id
from fleet.keys import KeyType, generate_private_key, private_key_pem
from fleet.registry import NewDevice
from fleet.workspace import Workspace


@dataclass(frozen=True, slots=True)
class ReplacementResult:
    device_id: str
    serial: int
    previous_serials: tuple[int, ...]  # every certificate it held before, all revoked
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
        identity = DeviceIdentity(
            device_id=device_id,
            tier=record.tier,
            env=record.env,
            trust_domain=workspace.config.trust_domain,
        )
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
        )
        install_identity(
            workspace.paths.device_cert(device_id),
            workspace.paths.device_key(device_id),
            ca.chain_pem(cert),
            private_key_pem(key),
        )
    return ReplacementResult(device_id, serial, tuple(previous), not_before, not_after)

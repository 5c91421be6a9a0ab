"""Revoking devices and publishing the CRL (``DIR/ca/crl.pem``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fleet.files import replace_atomically
from fleet.workspace import Workspace


@dataclass(frozen=True, slots=True)
class RevocationResult:
    device_id: str
    revoked_serials: list[int]
    crl_number: int | None

    @property
    def changed(self) -> bool:
        """False when the device had been revoked already (nothing was done)."""
        return bool(self.revoked_serials)


def revoke_device(
    workspace: Workspace,
    device_id: str,
    *,
    reason: x509.ReasonFlags = x509.ReasonFlags.unspecified,
    now: dt.datetime | None = None,
) -> RevocationResult:
    """Revoke every live certificate of ``device_id`` and publish a fresh CRL.

    Revoking a revoked device changes nothing and publishes nothing.
    """
    now = now or dt.datetime.now(dt.UTC)
    return _published(
        workspace, device_id, workspace.registry.revoke(device_id, reason, now=now), now
    )


def revoke_superseded(
    workspace: Workspace,
    device_id: str,
    *,
    reason: x509.ReasonFlags = x509.ReasonFlags.superseded,
    now: dt.datetime | None = None,
) -> RevocationResult:
    """Revoke the certificates a renewal replaced; the device's current one stays valid."""
    now = now or dt.datetime.now(dt.UTC)
    serials = workspace.registry.revoke_superseded(device_id, reason, now=now)
    return _published(workspace, device_id, serials, now)


def _published(
    workspace: Workspace, device_id: str, serials: list[int], now: dt.datetime
) -> RevocationResult:
    """Publish a CRL when something was revoked now (nothing changed: nothing published)."""
    if not serials:
        return RevocationResult(device_id=device_id, revoked_serials=[], crl_number=None)
    crl = publish_crl(workspace, now=now)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return RevocationResult(device_id=device_id, revoked_serials=serials, crl_number=number)


def publish_crl(
    workspace: Workspace,
    *,
    now: dt.datetime | None = None,
    valid_for: dt.timedelta | None = None,
) -> x509.CertificateRevocationList:
    """Sign a CRL of every revoked certificate and atomically replace ``crl.pem`` with it.

    The ``crl`` lock orders concurrent publishers, and each one reads the registry after taking
    it, so the file on disk always reflects the latest revocation (never an older snapshot).
    ``valid_for`` (default: the workspace's ``crl_valid_for``) sets nextUpdate. After a CA
    rotation every trusted issuing CA signs its own CRL (same entries, same number) and the
    file holds them all, the current issuer's first; that one is returned.
    """
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    with workspace.lock("crl"):
        entries = workspace.registry.revoked_entries()
        number = workspace.registry.next_crl_number()
        next_update = now + (valid_for or workspace.config.crl_valid_for)
        crls = [
            ca.build_crl(entries, crl_number=number, this_update=now, next_update=next_update)
            for ca in [workspace.ca, *workspace.previous_authorities()]
        ]
        replace_atomically(
            workspace.paths.crl, b"".join(crl.public_bytes(Encoding.PEM) for crl in crls)
        )
    return crls[0]


def load_crl(workspace: Workspace) -> x509.CertificateRevocationList:
    """The current issuing CA's CRL (the first of ``crl.pem``)."""
    return x509.load_pem_x509_crl(workspace.paths.crl.read_bytes())


PEM_CRL_BEGIN = b"-----BEGIN X509 CRL-----"


def split_pem_crls(data: bytes) -> list[bytes]:
    """The PEM blocks of a file holding one CRL per trusted issuing CA (as ``publish_crl`` writes)."""
    return [PEM_CRL_BEGIN + block for block in data.split(PEM_CRL_BEGIN)[1:]]

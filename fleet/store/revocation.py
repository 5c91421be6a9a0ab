"""Revoking devices and publishing the CRL (``DIR/ca/crl.pem``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fleet.kernel.files import remove_stale_temporaries, replace_atomically
from fleet.store.ca import build_root_crl
from fleet.store.workspace import Workspace


@dataclass(frozen=True, slots=True)
class RevocationResult:
    device_id: str
    revoked_serials: list[int]
    crl_number: int | None
    repaired_serials: list[int] = field(
        default_factory=list
    )  # revoked before, missing from the CRL

    @property
    def changed(self) -> bool:
        """False when the device had been revoked already and the CRL said so."""
        return bool(self.revoked_serials or self.repaired_serials)


def revoke_device(
    workspace: Workspace,
    device_id: str,
    *,
    reason: x509.ReasonFlags = x509.ReasonFlags.unspecified,
    now: dt.datetime | None = None,
) -> RevocationResult:
    """Revoke every live certificate of ``device_id`` and publish a fresh CRL.

    Revoking a revoked device publishes nothing, unless the CRL on disk lacks one of its
    revoked certificates (a publication was lost): then a fresh CRL repairs that.
    """
    now = now or dt.datetime.now(dt.UTC)
    serials = workspace.registry.revoke(device_id, reason, now=now)
    if serials:
        return _published(workspace, device_id, serials, now)
    missing = _revoked_but_not_listed(workspace, device_id)
    if not missing:
        return RevocationResult(device_id=device_id, revoked_serials=[], crl_number=None)
    crl = publish_crl(workspace, now=now)
    return RevocationResult(
        device_id=device_id,
        revoked_serials=[],
        crl_number=_number(crl),
        repaired_serials=missing,
    )


def revoke_devices(
    workspace: Workspace,
    device_ids: list[str],
    *,
    reason: x509.ReasonFlags = x509.ReasonFlags.unspecified,
    now: dt.datetime | None = None,
) -> list[RevocationResult]:
    """Revoke several devices and publish one CRL for them all (an emergency: a batch cut off
    at once, not one CRL per device). Every id is checked before anything is revoked; devices
    already revoked change nothing. A crash half way is finished by the next command, like any
    revocation (see :func:`finish_crl_publication`)."""
    now = now or dt.datetime.now(dt.UTC)
    registry = workspace.registry
    for device_id in device_ids:
        registry.get(device_id)  # UnknownDeviceError before any change
    revoked = [(device_id, registry.revoke(device_id, reason, now=now)) for device_id in device_ids]
    number = _number(publish_crl(workspace, now=now)) if any(s for _, s in revoked) else None
    return [
        RevocationResult(device_id, serials, number if serials else None)
        for device_id, serials in revoked
    ]


def _revoked_but_not_listed(workspace: Workspace, device_id: str) -> list[int]:
    revoked = [s for s, status, *_ in workspace.registry.certificate_history(device_id)
               if status == "revoked"]  # fmt: skip
    try:
        listed = {entry.serial_number for entry in load_crl(workspace)}
    except (FileNotFoundError, ValueError):
        listed = set()
    return [serial for serial in revoked if serial not in listed]


def _number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


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
    return RevocationResult(device_id=device_id, revoked_serials=serials, crl_number=_number(crl))


def publish_crl(
    workspace: Workspace,
    *,
    now: dt.datetime | None = None,
    valid_for: dt.timedelta | None = None,
) -> x509.CertificateRevocationList:
    """Sign a CRL of every revoked certificate and atomically replace ``crl.pem`` with it.

    The ``crl`` lock orders concurrent publishers, and each one reads the registry after taking
    it, so the file on disk always reflects the latest revocation (never an older snapshot).
    The registry counts revocations in the transactions that make them and records which count
    the file on disk covers, so a publication killed after the revocation committed is finished
    by the next command that opens the workspace (:func:`finish_crl_publication`).
    ``valid_for`` (default: the workspace's ``crl_valid_for``) sets nextUpdate. After a CA
    rotation every trusted issuing CA signs its own CRL (same entries, same number) and the
    file holds them all, the current issuer's first; that one is returned. The root's CRL (the
    issuing CAs it revoked) comes last, so every link of a chain has its CRL.
    """
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    with workspace.lock("crl"):
        remove_stale_temporaries(workspace.paths.crl)  # a killed publisher's (we hold the lock)
        covered, entries, issuers = workspace.registry.revocation_snapshot()
        number = workspace.registry.next_crl_number()
        next_update = now + (valid_for or workspace.config.crl_valid_for)
        crls = [
            ca.build_crl(entries, crl_number=number, this_update=now, next_update=next_update)
            for ca in [workspace.ca, *workspace.previous_authorities()]
        ]
        root_key = workspace.root_key()
        if root_key is not None:  # the root's own CRL, last: the issuing CAs it revoked
            crls.append(
                build_root_crl(
                    workspace.ca.root_cert,
                    root_key,
                    issuers,
                    crl_number=number,
                    this_update=now,
                    next_update=next_update,
                )
            )
        replace_atomically(
            workspace.paths.crl, b"".join(crl.public_bytes(Encoding.PEM) for crl in crls)
        )
        workspace.registry.crl_published(covered)
    return crls[0]


def finish_crl_publication(workspace: Workspace) -> bool:
    """Publish the CRL when a revocation was committed but never published (its publisher
    was killed in between), and remove what a killed publisher left in ``ca/``. Returns whether
    a CRL was published. Does nothing while another process publishes (it covers it)."""
    registry = workspace.registry
    pending = registry.crl_publication_pending()
    if not pending and not remove_stale_temporaries(workspace.paths.crl, dry_run=True):
        return False
    with workspace.lock("crl", wait=False) as held:
        if not held:
            return False
        remove_stale_temporaries(workspace.paths.crl)
    if pending and registry.crl_publication_pending():
        publish_crl(workspace)
        return True
    return False


def load_crl(workspace: Workspace) -> x509.CertificateRevocationList:
    """The current issuing CA's CRL (the first of ``crl.pem``)."""
    return x509.load_pem_x509_crl(workspace.paths.crl.read_bytes())


PEM_CRL_BEGIN = b"-----BEGIN X509 CRL-----"


def split_pem_crls(data: bytes) -> list[bytes]:
    """The PEM blocks of a file holding one CRL per trusted issuing CA (as ``publish_crl`` writes)."""
    return [PEM_CRL_BEGIN + block for block in data.split(PEM_CRL_BEGIN)[1:]]

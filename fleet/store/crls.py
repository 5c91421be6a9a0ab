"""CRLs as the fleet's relying parties read them: every CRL of a file or a URL, each signature
checked against a trusted issuing CA (or the root), summed up as one :class:`CrlState`.

The broker enforces it, ``fleet crl sync`` checks what it copies with it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fleet.kernel.errors import FleetError
from fleet.store.revocation import PEM_CRL_BEGIN, split_pem_crls
from fleet.store.workspace import WorkspacePaths


class CrlError(FleetError):
    """A CRL that cannot be read, is not signed by a trusted CA, or lacks what we rely on."""


@dataclass(frozen=True, slots=True)
class CrlState:
    """The CRLs in force (one per trusted issuing CA), their signatures checked."""

    crls: tuple[x509.CertificateRevocationList, ...]
    number: int
    numbers: dict[str, int]  # issuer (RFC 4514) -> the CRL number of that issuer's CRL
    this_update: dt.datetime
    next_update: dt.datetime  # the earliest of them: stale as soon as one is
    revoked: frozenset[int]
    issuers: frozenset[x509.Name]  # whose certificates can be checked (others are refused)
    # key ids of the trusted issuing CAs the root's CRL revokes; whether a root CRL came at all
    # (then every link of a chain has a CRL and the whole chain is checked)
    revoked_issuer_keys: frozenset[bytes] = frozenset()
    has_root_crl: bool = False

    def is_stale(self, now: dt.datetime) -> bool:
        return now >= self.next_update


def load_crl(path: Path, issuers: list[x509.Certificate]) -> CrlState:
    """Read every CRL in ``path``; each must be signed by one of ``issuers`` (CrlError)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CrlError(f"{path}: no CRL; run 'fleet crl publish' to create one") from None
    return parse_crls(data, issuers, source=str(path))


def parse_crls(data: bytes, issuers: list[x509.Certificate], *, source: str) -> CrlState:
    """Every CRL in ``data`` (PEM, one or more; or one DER), each signed by one of ``issuers``."""
    if PEM_CRL_BEGIN in data:
        blocks = split_pem_crls(data)
        load = x509.load_pem_x509_crl
    else:
        blocks, load = [data], x509.load_der_x509_crl
    crls = []
    signers: list[x509.Certificate] = []
    for block in blocks:
        try:
            crl = load(block)
        except ValueError as exc:
            raise CrlError(f"{source}: not a CRL ({exc})") from exc
        signer = next(
            (
                issuer
                for issuer in issuers
                if crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            ),
            None,
        )
        if signer is None:
            raise CrlError(
                f"{source}: the CRL of {crl.issuer.rfc4514_string()} does not verify against a "
                "trusted issuing CA; ignored"
            )
        if crl.next_update_utc is None:
            raise CrlError(f"{source}: CRL has no nextUpdate")
        crls.append(crl)
        signers.append(signer)
    root_revoked = {
        entry.serial_number
        for crl, signer in zip(crls, signers, strict=True)
        if signer.subject == signer.issuer  # self-issued: the root's own CRL
        for entry in crl
    }
    return CrlState(
        crls=tuple(crls),
        number=max(_crl_number(crl) for crl in crls),
        numbers={crl.issuer.rfc4514_string(): _crl_number(crl) for crl in crls},
        this_update=min(crl.last_update_utc for crl in crls),
        next_update=min(crl.next_update_utc for crl in crls if crl.next_update_utc),
        revoked=frozenset(entry.serial_number for crl in crls for entry in crl),
        issuers=frozenset(crl.issuer for crl in crls),
        revoked_issuer_keys=frozenset(
            _key_id(issuer) for issuer in issuers if issuer.serial_number in root_revoked
        ),
        has_root_crl=any(signer.subject == signer.issuer for signer in signers),
    )


def _key_id(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def authority_key_id(cert: x509.Certificate) -> bytes | None:
    """The key identifier ``cert`` names its issuer by (None without the extension)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def issuer_files(paths: WorkspacePaths) -> list[Path]:
    """The trusted issuing CAs: the current one, then those a rotation replaced."""
    return paths.trusted_issuer_certs()


def load_retired_key_ids(paths: WorkspacePaths) -> frozenset[bytes]:
    """Subject key identifiers of the issuing CAs retired by ``fleet ca retire``."""
    key_ids = set()
    for path in sorted(paths.retired_issuers_dir.glob("*.crt")):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except (OSError, ValueError, x509.ExtensionNotFound):
            continue
        key_ids.add(ski.value.digest)
    return frozenset(key_ids)


def load_issuers(paths: WorkspacePaths) -> list[x509.Certificate]:
    """The CA certificates whose CRLs the broker accepts: the trusted issuing intermediates,
    and the root (its CRL lists the issuing CAs it revoked)."""
    issuers = []
    for path in [*issuer_files(paths), paths.root_cert]:
        try:
            issuers += x509.load_pem_x509_certificates(path.read_bytes())
        except (FileNotFoundError, ValueError) as exc:
            raise CrlError(f"{path}: cannot load the issuing CA ({exc})") from exc
    return issuers

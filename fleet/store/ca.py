"""The fleet's certificate authority: a root, an issuing intermediate, and what they sign.

Objects in, objects out: nothing here touches the file system (see :mod:`fleet.store.workspace`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.kernel.errors import CertificateError, UsageError
from fleet.kernel.identity import DeviceIdentity
from fleet.kernel.keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    generate_private_key,
    key_type_of,
    signature_hash,
)

REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    flag.name.replace("_", "-"): flag
    for flag in x509.ReasonFlags
    if flag not in (x509.ReasonFlags.remove_from_crl,)
}


def parse_revocation_reason(text: str) -> x509.ReasonFlags:
    """Map a CLI reason (``key-compromise``, ``superseded``, ...) to its RFC 5280 flag."""
    key = text.strip().lower().replace("_", "-")
    if key not in REVOCATION_REASONS:
        raise UsageError(
            f"unknown revocation reason {text!r}: choose one of {', '.join(REVOCATION_REASONS)}"
        )
    return REVOCATION_REASONS[key]


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """One line of a CRL."""

    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _check_validity(not_before: dt.datetime, not_after: dt.datetime) -> None:
    if not_before.tzinfo is None or not_after.tzinfo is None:
        raise UsageError("certificate validity must be given as UTC-aware datetimes")
    if not_after <= not_before:
        raise UsageError(
            f"notAfter {not_after.isoformat()} is not after notBefore {not_before.isoformat()}: "
            "give a positive validity"
        )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage(key_type: KeyType) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_type.is_rsa,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def create_root_ca(
    *,
    common_name: str,
    organization: str,
    key_type: KeyType,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed root: the trust anchor devices and brokers load."""
    _check_validity(not_before, not_after)
    key = generate_private_key(key_type)
    name = _name(common_name, organization)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, signature_hash(key))
    )
    return cert, key


def create_intermediate_ca(
    *,
    parent_cert: x509.Certificate,
    parent_key: PrivateKey,
    common_name: str,
    organization: str,
    key_type: KeyType,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[x509.Certificate, PrivateKey]:
    """An issuing intermediate (path length 0) signed by ``parent_cert``."""
    _check_validity(not_before, not_after)
    key = generate_private_key(key_type)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organization))
        .issuer_name(parent_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(parent_cert), critical=False)
        .sign(parent_key, signature_hash(parent_key))
    )
    return cert, key


# Issuing Distribution Point (RFC 5280 5.2.5) of each CRL: what it covers. No distribution point
# name, so it matches whatever (or no) CRL distribution point a certificate names; EMQX, for
# one, enforces only CRLs that carry the extension.
_END_ENTITIES_ONLY = x509.IssuingDistributionPoint(
    full_name=None,
    relative_name=None,
    only_contains_user_certs=True,
    only_contains_ca_certs=False,
    only_some_reasons=None,
    indirect_crl=False,
    only_contains_attribute_certs=False,
)
_CAS_ONLY = x509.IssuingDistributionPoint(
    full_name=None,
    relative_name=None,
    only_contains_user_certs=False,
    only_contains_ca_certs=True,
    only_some_reasons=None,
    indirect_crl=False,
    only_contains_attribute_certs=False,
)


def build_root_crl(
    root_cert: x509.Certificate,
    root_key: PrivateKey,
    entries: Iterable[RevokedEntry],
    *,
    crl_number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
) -> x509.CertificateRevocationList:
    """The root's own CRL: the issuing intermediates it revoked (``fleet ca revoke-issuing``).

    With it every certificate of a chain has a CRL, so ``openssl verify -crl_check_all`` (and a
    broker checking the whole chain) can decide each link."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root_cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(_authority_key_id(root_cert), critical=False)
        .add_extension(_CAS_ONLY, critical=True)
    )
    return _with_entries(builder, entries).sign(root_key, signature_hash(root_key))


def _with_entries(
    builder: x509.CertificateRevocationListBuilder, entries: Iterable[RevokedEntry]
) -> x509.CertificateRevocationListBuilder:
    """``builder`` with one revoked-certificate entry (serial, date, reason) per entry."""
    for entry in entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        if entry.reason is not x509.ReasonFlags.unspecified:
            revoked = revoked.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    return builder


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


class DeviceCertificateTemplate:
    """Issues device certificates that share everything but identity, key and serial."""

    def __init__(
        self,
        builder: x509.CertificateBuilder,
        signing_key: PrivateKey,
        digest: hashes.SHA256 | hashes.SHA384 | None,
    ) -> None:
        self._builder = builder
        self._signing_key = signing_key
        self._digest = digest

    def issue(
        self, identity: DeviceIdentity, public_key: PublicKey, *, serial: int | None = None
    ) -> x509.Certificate:
        return (
            self._builder.subject_name(identity.subject())
            .public_key(public_key)
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(identity.subject_alternative_name(), critical=False)
            .sign(self._signing_key, self._digest)
        )


class CertificateAuthority:
    """The issuing intermediate that signs device and broker certificates, and the CRL.

    ``root_cert`` is kept to build chains; the root key is not needed to issue and is not held.
    """

    def __init__(
        self,
        *,
        root_cert: x509.Certificate,
        issuing_cert: x509.Certificate,
        issuing_key: PrivateKey,
        crl_distribution_url: str | None = None,
    ) -> None:
        self.root_cert = root_cert
        self.issuing_cert = issuing_cert
        self.issuing_key = issuing_key
        self.crl_distribution_url = crl_distribution_url
        self._aki = _authority_key_id(issuing_cert)
        self._hash = signature_hash(issuing_key)
        self._issuing_pem = issuing_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def issuing_pem(self) -> bytes:
        return self._issuing_pem

    def chain_pem(self, leaf: x509.Certificate) -> bytes:
        """``leaf`` followed by the issuing intermediate: what a device or broker presents."""
        return leaf.public_bytes(serialization.Encoding.PEM) + self._issuing_pem

    def _leaf_template(
        self, *, key_type: KeyType, not_before: dt.datetime, not_after: dt.datetime
    ) -> x509.CertificateBuilder:
        """What every leaf of one key type and validity shares (no subject, key or serial)."""
        _check_validity(not_before, not_after)
        builder = (
            x509.CertificateBuilder()
            .issuer_name(self.issuing_cert.subject)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(key_type), critical=True)
            .add_extension(self._aki, critical=False)
        )
        if self.crl_distribution_url:
            point = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(self.crl_distribution_url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        return builder

    def device_template(
        self,
        *,
        key_type: KeyType,
        not_before: dt.datetime,
        not_after: dt.datetime,
        extended_key_usage: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    ) -> DeviceCertificateTemplate:
        """A template for many device certificates that share key type and validity.

        Building the shared part once makes issuing a batch faster. ``extended_key_usage``
        exists so test fixtures can issue deliberately wrong certificates (e.g. serverAuth
        only, or none) that a strict broker must refuse.
        """
        builder = self._leaf_template(key_type=key_type, not_before=not_before, not_after=not_after)
        if extended_key_usage:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False
            )
        return DeviceCertificateTemplate(builder, self.issuing_key, self._hash)

    def issue_device(
        self,
        identity: DeviceIdentity,
        public_key: PublicKey,
        *,
        not_before: dt.datetime,
        not_after: dt.datetime,
        serial: int | None = None,
        extended_key_usage: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    ) -> x509.Certificate:
        """A device certificate: CN and SPIFFE URI name the device, EKU clientAuth only."""
        template = self.device_template(
            key_type=key_type_of(public_key),
            not_before=not_before,
            not_after=not_after,
            extended_key_usage=extended_key_usage,
        )
        return template.issue(identity, public_key, serial=serial)

    def issue_server(
        self,
        *,
        common_name: str,
        hosts: Iterable[str],
        public_key: PublicKey,
        not_before: dt.datetime,
        not_after: dt.datetime,
        extended_key_usage: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.SERVER_AUTH,),
    ) -> x509.Certificate:
        """A broker certificate with EKU serverAuth (or ``extended_key_usage``: a cluster
        member that is server and client both) and a SAN for every host name or IP."""
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):  # de-duplicate, keep order
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        if not names:
            raise UsageError("a broker certificate needs at least one host name or IP address")
        builder = self._leaf_template(
            key_type=key_type_of(public_key), not_before=not_before, not_after=not_after
        )
        return (
            builder.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False)
            .sign(self.issuing_key, self._hash)
        )

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        identity: DeviceIdentity,
        *,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> x509.Certificate:
        """Issue a device certificate for a device-generated CSR (the device keeps its key).

        Only the CSR's public key is used: subject and extensions come from ``identity``, so a
        CSR cannot ask for more than the fleet grants.
        """
        if not csr.is_signature_valid:
            raise CertificateError(
                "the CSR's signature does not verify: regenerate it with the device's key",
                device_id=identity.device_id,
            )
        public_key = csr.public_key()
        if not isinstance(public_key, PublicKey):
            raise CertificateError(
                "the CSR's key algorithm is not supported: use ECDSA, RSA, Ed25519 or ML-DSA",
                device_id=identity.device_id,
            )
        key_type_of(public_key)  # raises for unsupported curves and sizes
        return self.issue_device(identity, public_key, not_before=not_before, not_after=not_after)

    def build_crl(
        self,
        entries: Iterable[RevokedEntry],
        *,
        crl_number: int,
        this_update: dt.datetime,
        next_update: dt.datetime,
    ) -> x509.CertificateRevocationList:
        """A CRL signed by the issuing CA listing ``entries`` with their reasons and dates."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.issuing_cert.subject)
            .last_update(this_update)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(crl_number), critical=False)
            .add_extension(self._aki, critical=False)
            .add_extension(_END_ENTITIES_ONLY, critical=True)  # RFC 5280 5.2.5: critical
        )
        return _with_entries(builder, entries).sign(self.issuing_key, self._hash)

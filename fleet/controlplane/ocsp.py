"""OCSP (RFC 6960) answers for every certificate the fleet issued: good, revoked, or unknown.

The issuing CA that signed a certificate signs the answer about it (no delegated responder),
so any client that trusts the fleet's root can check it. Requests about another issuer get
``unauthorized``; a request that does not parse gets ``malformedRequest``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp

from fleet.kernel.keys import PublicKey, signature_hash
from fleet.store.ca import CertificateAuthority
from fleet.store.registry import Registry

_ANSWER_LIFETIME = dt.timedelta(hours=1)


def _key_bits(certificate: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents, which OCSP's issuerKeyHash hashes."""
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    if isinstance(key, PublicKey):  # Ed25519, ML-DSA: the raw key is the BIT STRING's contents
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raise ValueError("unsupported issuer key")


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    digest = hashes.Hash(algorithm)
    digest.update(data)
    return digest.finalize()


@dataclass(frozen=True, slots=True)
class OcspAnswer:
    der: bytes
    status: str  # good, revoked, unknown, or the error status (malformed, unauthorized)


class OcspResponder:
    """Answers OCSP requests from the registry, signed by the CA that issued the certificate."""

    def __init__(self, registry: Registry, authorities: list[CertificateAuthority]) -> None:
        self.registry = registry
        self.authorities = authorities

    def _authority(self, request: ocsp.OCSPRequest) -> CertificateAuthority | None:
        algorithm = request.hash_algorithm
        for ca in self.authorities:
            issuer = ca.issuing_cert
            if request.issuer_key_hash == _digest(
                algorithm, _key_bits(issuer)
            ) and request.issuer_name_hash == _digest(algorithm, issuer.subject.public_bytes()):
                return ca
        return None

    def answer(self, request_der: bytes, *, now: dt.datetime | None = None) -> OcspAnswer:
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            request.hash_algorithm  # noqa: B018  (an unknown algorithm raises here)
        except (ValueError, UnsupportedAlgorithm):
            return MALFORMED_ANSWER
        ca = self._authority(request)
        if ca is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED, "unauthorized")
        now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
        found = self.registry.certificate_status(request.serial_number)
        revoked = found[1] if found is not None else None
        if found is None:
            status, label = ocsp.OCSPCertStatus.UNKNOWN, "unknown"
        elif revoked is not None:
            status, label = ocsp.OCSPCertStatus.REVOKED, "revoked"
        else:
            status, label = ocsp.OCSPCertStatus.GOOD, "good"
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash,
            issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number,
            algorithm=request.hash_algorithm,
            cert_status=status,
            this_update=now,
            next_update=now + _ANSWER_LIFETIME,
            revocation_time=revoked.revoked_at if revoked else None,
            revocation_reason=revoked.reason
            if revoked and revoked.reason is not x509.ReasonFlags.unspecified
            else None,
        )
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, ca.issuing_cert)
        try:
            nonce = request.extensions.get_extension_for_class(x509.OCSPNonce)
            builder = builder.add_extension(nonce.value, critical=False)
        except x509.ExtensionNotFound:
            pass
        response = builder.sign(ca.issuing_key, signature_hash(ca.issuing_key))
        return OcspAnswer(response.public_bytes(serialization.Encoding.DER), label)


def _unsuccessful(status: ocsp.OCSPResponseStatus, label: str) -> OcspAnswer:
    response = ocsp.OCSPResponseBuilder.build_unsuccessful(status)
    return OcspAnswer(response.public_bytes(serialization.Encoding.DER), label)


MALFORMED_ANSWER = _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST, "malformed")

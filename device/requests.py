"""What a device sends the control plane: a fresh key, its CSR and the proof of possession.

Synchronous and CPU-bound (key generation, two signatures): callers on an event loop run these
in a worker thread.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from fleet.kernel.errors import CertificateError
from fleet.kernel.keys import (
    KeyType,
    PrivateKey,
    generate_private_key,
    key_type_of,
    load_private_key,
    private_key_pem,
    signature_hash,
)
from fleet.kernel.mqtt_api import EnrollRequest, RenewRequest, encode, request_timestamp, sign_proof


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request ready to publish, and the new key that stays on the device."""

    request_id: str
    payload: bytes
    key_pem: bytes


def new_request_id() -> str:
    """16 random URL-safe characters (what the topics and client ids of requests use)."""
    return secrets.token_urlsafe(12)


def _csr_pem(key: PrivateKey, device_id: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, signature_hash(key))
    )
    return csr.public_bytes(Encoding.PEM).decode()


def _load_pair(cert: Path, key: Path, owner: str) -> tuple[str, PrivateKey]:
    """(first certificate of ``cert`` as PEM, the key of ``key``)."""
    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        private = load_private_key(key.read_bytes(), source=str(key))
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot read {cert} / {key} ({exc})", device_id=owner) from exc
    return leaf.public_bytes(Encoding.PEM).decode(), private


def prepare_enrollment(
    device_id: str,
    claim_cert: Path,
    claim_key: Path,
    *,
    hardware_serial: str = "",
    key_type: KeyType = KeyType.EC_P256,
    request_id: str | None = None,
) -> PreparedRequest:
    """A new key for ``device_id`` and the request that asks for its first certificate."""
    request_id = request_id or new_request_id()
    claim_pem, claim_private = _load_pair(claim_cert, claim_key, device_id)
    key = generate_private_key(key_type)
    csr = _csr_pem(key, device_id)
    unsigned = EnrollRequest(
        device_id=device_id,
        csr=csr,
        claim_certificate=claim_pem,
        signature="",
        timestamp=request_timestamp(),
        hardware_serial=hardware_serial,
    )
    request = replace(unsigned, signature=sign_proof(claim_private, unsigned.proof(request_id)))
    return PreparedRequest(request_id, encode(request), private_key_pem(key))


def prepare_renewal(device_id: str, cert: Path, key: Path) -> PreparedRequest:
    """A new key (same type as the current one) and the request that renews ``device_id``."""
    current_pem, current_key = _load_pair(cert, key, device_id)
    key_new = generate_private_key(key_type_of(current_key))
    csr = _csr_pem(key_new, device_id)
    request_id = new_request_id()
    unsigned = RenewRequest(
        request_id=request_id,
        csr=csr,
        certificate=current_pem,
        signature="",
        timestamp=request_timestamp(),
    )
    request = replace(unsigned, signature=sign_proof(current_key, unsigned.proof(device_id)))
    return PreparedRequest(request_id, encode(request), private_key_pem(key_new))

"""The one place that builds a device's TLS context: strict about the broker, as the broker is
strict about the device (only the fleet's root as trust anchor, hostname checked, TLS >= 1.2)."""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device.identity_files import recover_identity
from fleet.errors import CertificateError


def device_tls_context(
    trust_anchor: Path,
    cert: Path,
    key: Path,
    *,
    device_id: str,
    check_hostname: bool = True,
    keylog_file: str | None = None,
    present_certificate: bool = True,
) -> ssl.SSLContext:
    """A client context holding the device's chain and key.

    ``trust_anchor`` is the *only* CA trusted (no system store). ``SSLKEYLOGFILE`` (or
    ``keylog_file``) writes TLS secrets for Wireshark. Errors name the device and the reason.
    ``present_certificate=False`` leaves the chain out: a device that shows the broker nothing.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checks
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    try:
        context.load_verify_locations(cafile=str(trust_anchor))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot load trust anchor {trust_anchor}: {exc}",
            device_id=device_id,
            code="bad_trust_anchor",
        ) from exc
    keylog = keylog_file or os.environ.get("SSLKEYLOGFILE")
    if keylog:
        context.keylog_filename = keylog
    if not present_certificate:
        return context
    recover_identity(cert, key)  # a renewal that a crash interrupted
    for path in (cert, key):
        if not path.is_file():
            raise CertificateError(f"missing {path}", device_id=device_id, code="missing_file")
    try:
        context.load_cert_chain(str(cert), str(key))
    except PermissionError as exc:
        raise CertificateError(
            f"cannot read {exc.filename}: permission denied",
            device_id=device_id,
            code="permission_denied",
        ) from exc
    except ssl.SSLError as exc:
        mismatch = "KEY_VALUES_MISMATCH" in str(exc)
        reason = "the key does not match the certificate" if mismatch else str(exc)
        raise CertificateError(
            f"unusable certificate or key ({reason})",
            device_id=device_id,
            code="key_mismatch" if mismatch else "unusable_certificate",
        ) from exc
    return context


def spki_pin(certificate_der: bytes) -> str:
    """``sha256/BASE64`` of a certificate's SubjectPublicKeyInfo: the pin of its public key,
    which survives re-issuing the certificate with the same key (and only then)."""
    try:
        key = x509.load_der_x509_certificate(certificate_der).public_key()
    except ValueError:
        return "sha256/-"  # nothing presented, or nothing readable: matches no pin
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def parse_pin(text: str) -> str:
    """A ``sha256/BASE64`` pin (curl's ``--pinnedpubkey sha256//BASE64`` takes the same hash),
    checked: a SHA-256 digest, 32 bytes, in standard base64."""
    prefix, _, encoded = text.strip().partition("/")
    if len(encoded) == 45 and encoded.startswith("/"):  # curl's sha256//BASE64
        encoded = encoded[1:]
    try:
        digest = base64.b64decode(encoded, validate=True)
    except ValueError:
        digest = b""
    if prefix != "sha256" or len(digest) != 32:
        raise ValueError(
            f"invalid pin {text!r}: use sha256/BASE64 of the broker key's SubjectPublicKeyInfo "
            "(openssl x509 -in server.crt -pubkey -noout | openssl pkey -pubin -outform der | "
            "openssl dgst -sha256 -binary | base64)"
        )
    return "sha256/" + base64.b64encode(digest).decode()

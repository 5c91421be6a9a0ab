"""Human-readable descriptions of certificates, for ``fleet show``."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from fleet.kernel.keys import key_type_of


def describe_certificate(cert: x509.Certificate) -> dict[str, str]:
    """The fields an operator checks, in the order they read them."""
    info = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "X"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key_type": key_type_of(cert.public_key()).value,
        "signature": cert.signature_hash_algorithm.name if cert.signature_hash_algorithm else "-",
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    }
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            info["subject_alt_names"] = ", ".join(str(name.value) for name in value)
        elif isinstance(value, x509.ExtendedKeyUsage):
            info["extended_key_usage"] = ", ".join(oid._name for oid in value)
        elif isinstance(value, x509.BasicConstraints):
            info["basic_constraints"] = f"CA={value.ca}"
        elif isinstance(value, x509.CRLDistributionPoints):
            info["crl_distribution_points"] = ", ".join(
                str(name.value) for point in value for name in (point.full_name or [])
            )
    return info

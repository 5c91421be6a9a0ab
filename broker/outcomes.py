"""Every connection attempt ends in exactly one outcome; this module names and classifies them."""

from __future__ import annotations

from OpenSSL import SSL

# The broker's vocabulary lives with the controller, which reads it too (scenario files).
from fleet.kernel.broker_reasons import DEVICE_REASONS, BrokerEvent, Outcome, SessionEnd

__all__ = [
    "DEVICE_REASONS",
    "UNABLE_TO_GET_CRL",
    "BrokerEvent",
    "Outcome",
    "SessionEnd",
    "classify_tls_error",
    "classify_verify_error",
    "openssl_reason",
    "refine_verify_failure",
]


# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h).
_VERIFY_CODES: dict[int, Outcome] = {
    2: Outcome.UNKNOWN_CA,  # unable to get issuer certificate
    3: Outcome.UNKNOWN_CA,  # no CRL from the issuing CA: one this broker does not trust (retired)
    9: Outcome.NOT_YET_VALID,
    10: Outcome.EXPIRED,
    11: Outcome.CRL_STALE,  # CRL not yet valid
    12: Outcome.CRL_STALE,  # CRL has expired: the fail-closed policy at work
    18: Outcome.UNKNOWN_CA,  # self-signed leaf
    19: Outcome.UNKNOWN_CA,  # self-signed certificate in chain
    20: Outcome.UNKNOWN_CA,  # unable to get local issuer certificate
    21: Outcome.UNKNOWN_CA,  # unable to verify the first certificate
    23: Outcome.REVOKED,
    26: Outcome.BAD_EKU,  # unsupported certificate purpose
}

_PROTOCOL_REASONS = (
    "wrong version number",
    "http request",
    "unknown protocol",
    "unexpected message",
    "record layer failure",
    "packet length too long",
    "record length mismatch",
    "unsupported protocol",
    "bad packet length",
    "no shared cipher",
    "invalid alert",
    "decode error",
)


# OpenSSL 4.0's words when the client offered no group, or no signature scheme, the broker has
_NO_SHARED_GROUP = ("no suitable key share", "no shared group")
_NO_SHARED_SIGNATURE = ("no suitable signature algorithm", "no shared signature algorithms")

_VERIFY_TEXT: dict[int, str] = {
    2: "unable to get issuer certificate",
    3: "unable to get certificate CRL",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    11: "CRL is not yet valid",
    12: "CRL has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    26: "unsupported certificate purpose",
}
UNABLE_TO_GET_CRL = 3


def refine_verify_failure(code: int, detail: str) -> tuple[Outcome, str]:
    """The outcome of a chain the verify callback refused, with the verify error spelled out."""
    text = _VERIFY_TEXT.get(code, f"X509 verify error {code}")
    if code == UNABLE_TO_GET_CRL:
        text = "no CRL from its issuing CA, which is not (or no longer) trusted"
    return classify_verify_error(code), f"{detail}: {text}"


def classify_verify_error(code: int) -> Outcome:
    return _VERIFY_CODES.get(code, Outcome.OTHER)


def openssl_reason(exc: SSL.Error) -> str:
    """The OpenSSL reason strings of ``exc``, joined (e.g. 'peer did not return a certificate')."""
    parts = []
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            parts.append(str(entry[-1]))
    return "; ".join(parts) or str(exc) or type(exc).__name__


def classify_tls_error(exc: SSL.Error, verify_code: int | None) -> Outcome:
    """Classify a failed server-side handshake from the verify code or the OpenSSL reason."""
    if verify_code is not None:
        return classify_verify_error(verify_code)
    reason = openssl_reason(exc).lower()
    if "did not return a certificate" in reason or "certificate required" in reason:
        return Outcome.NO_CERTIFICATE
    if any(marker in reason for marker in _NO_SHARED_GROUP):
        return Outcome.NO_SHARED_GROUP
    if any(marker in reason for marker in _NO_SHARED_SIGNATURE):
        return Outcome.NO_SHARED_SIGNATURE_ALGORITHM
    if any(marker in reason for marker in _PROTOCOL_REASONS):
        return Outcome.PROTOCOL_ERROR
    return Outcome.OTHER

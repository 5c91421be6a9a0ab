"""Client-side outcome of a connection attempt, and its latency split into phases."""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass


class ConnectOutcome(enum.StrEnum):
    CONNECTED = "connected"
    REJECTED_BY_BROKER = "rejected_by_broker"  # the broker sent a TLS alert or closed on us
    BROKER_UNTRUSTED = "broker_untrusted"  # we refused the broker's certificate
    CONNACK_REFUSED = "connack_refused"
    TIMEOUT = "timeout"
    NETWORK_ERROR = "network_error"
    CREDENTIALS_ERROR = "credentials_error"  # the device's own key or certificate is unusable


@dataclass(frozen=True, slots=True)
class ConnectAttempt:
    """One attempt: its outcome, a detail (alert, verify reason, CONNACK code) and timings."""

    device_id: str
    outcome: ConnectOutcome
    detail: str | None = None
    tcp_seconds: float | None = None
    tls_seconds: float | None = None
    mqtt_seconds: float | None = None

    @property
    def total_seconds(self) -> float | None:
        parts = (self.tcp_seconds, self.tls_seconds, self.mqtt_seconds)
        return None if any(p is None for p in parts) else sum(p for p in parts if p is not None)


_ALERT_PREFIXES = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")
# The TLS alerts a broker refuses a client certificate with, as :func:`alert_name` spells them.
TLS_ALERTS = (
    "bad_certificate",
    "unsupported_certificate",
    "certificate_revoked",
    "certificate_expired",
    "certificate_unknown",
    "unknown_ca",
    "access_denied",
    "handshake_failure",
    "certificate_required",
    "decrypt_error",
    "internal_error",
    "protocol_version",
)


def alert_name(exc: ssl.SSLError) -> str | None:
    """``certificate_revoked`` for an SSLError carrying the TLS alert SSLV3_ALERT_CERTIFICATE_REVOKED."""
    reason = getattr(exc, "reason", None) or ""
    for prefix in _ALERT_PREFIXES:
        if reason.startswith(prefix):
            return reason[len(prefix) :].lower()
    return None


def classify_tls_failure(exc: BaseException) -> tuple[ConnectOutcome, str]:
    """Map what the client saw during or right after the handshake to an outcome and detail."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectOutcome.BROKER_UNTRUSTED, exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        alert = alert_name(exc)
        if alert is not None:
            return ConnectOutcome.REJECTED_BY_BROKER, alert
        return ConnectOutcome.NETWORK_ERROR, getattr(exc, "reason", None) or str(exc)
    if isinstance(exc, TimeoutError):
        return ConnectOutcome.TIMEOUT, "no answer in time"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return ConnectOutcome.REJECTED_BY_BROKER, "connection closed by the broker"
    return ConnectOutcome.NETWORK_ERROR, str(exc) or type(exc).__name__

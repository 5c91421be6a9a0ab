"""Client-side outcome of a connection attempt, and its latency split into phases."""

from __future__ import annotations

import enum
import re
import ssl
from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode


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
    """One attempt: its outcome, its reason (one of :data:`REASONS_BY_OUTCOME` for the outcome),
    the words the failure came with (``message``, for people) and timings."""

    device_id: str
    outcome: ConnectOutcome
    detail: str | None = None
    tcp_seconds: float | None = None
    tls_seconds: float | None = None
    mqtt_seconds: float | None = None
    message: str | None = None
    local_address: str | None = None  # "IP:PORT": how the broker's logs name this attempt
    group: str | None = None  # the key exchange's group (X25519MLKEM768, P-256 …) once agreed
    broker_signature: str | None = None  # the scheme the broker signed with (mldsa65 …)
    handshake_bytes: int | None = None  # TLS records both ways, until the broker's verdict

    @property
    def total_seconds(self) -> float | None:
        parts = (self.tcp_seconds, self.tls_seconds, self.mqtt_seconds)
        return None if any(p is None for p in parts) else sum(p for p in parts if p is not None)


# What a device sees when a live session ends without it asking: a sighting of its own kind.
DROPPED = "dropped"

# OpenSSL 3.0 (Python's ssl here) says SSLV3_ALERT_…, OpenSSL 4.0 (pyOpenSSL) TLS_ALERT_…
_ALERT_PREFIXES = (
    "SSLV3_ALERT_",
    "TLSV1_ALERT_",
    "TLSV13_ALERT_",
    "TLS_ALERT_",
    "SSL_TLS_ALERT_",
)
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


class UntrustedReason(enum.StrEnum):
    """Why the device refused the broker's certificate."""

    UNKNOWN_ISSUER = "unknown_issuer"  # not issued by (a CA under) the device's trust anchor
    SELF_SIGNED = "self_signed"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    HOSTNAME_MISMATCH = "hostname_mismatch"
    CERTIFICATE_REVOKED = "certificate_revoked"
    BAD_EKU = "bad_eku"  # not a TLS server certificate
    BAD_SIGNATURE = "bad_signature"
    PIN_MISMATCH = "pin_mismatch"  # a valid chain, but not the key the device pins
    OTHER = "other"


# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) by reason.
_VERIFY_CODES = {
    2: UntrustedReason.UNKNOWN_ISSUER,  # unable to get issuer certificate
    20: UntrustedReason.UNKNOWN_ISSUER,  # unable to get local issuer certificate
    21: UntrustedReason.UNKNOWN_ISSUER,  # unable to verify the first certificate
    18: UntrustedReason.SELF_SIGNED,
    19: UntrustedReason.SELF_SIGNED,  # self-signed certificate in chain
    9: UntrustedReason.CERTIFICATE_NOT_YET_VALID,
    10: UntrustedReason.CERTIFICATE_EXPIRED,
    23: UntrustedReason.CERTIFICATE_REVOKED,
    26: UntrustedReason.BAD_EKU,  # unsupported certificate purpose
    7: UntrustedReason.BAD_SIGNATURE,
    62: UntrustedReason.HOSTNAME_MISMATCH,
    64: UntrustedReason.HOSTNAME_MISMATCH,  # IP address mismatch
}

CLOSED_BY_BROKER = "connection_closed"  # refused without an alert: the broker just closed
# the broker accepted our certificate, then closed on our CONNECT without a CONNACK (RabbitMQ's
# answer to an MQTT 5 CONNECT it cannot parse): a refusal at CONNECT, not at TLS
CLOSED_AT_CONNECT = "closed_at_connect"
HANDSHAKE_TIMEOUT = "handshake_timeout"
NO_CONNACK = "no_connack"
CONNECTION_REFUSED = "connection_refused"
TLS_ERROR = "tls_error"  # a TLS failure that is neither an alert nor a verification error
# refused because the two sides could agree on nothing (device.connect.NegotiationFailure)
NO_SHARED_GROUP = "no_shared_group"  # no key-exchange group in common
NO_SHARED_SIGNATURE_ALGORITHM = "no_shared_signature_algorithm"  # none the device's key makes
OTHER = "other"


class DropReason(enum.StrEnum):
    """Why a live session ended, as far as the device can tell. MQTT 3.1.1 has no DISCONNECT
    from the broker, so a broker that closes a session (revoked, taken over …) cannot say why:
    the device reports ``connection_lost`` and finds the reason at its next handshake."""

    CONNECTION_LOST = "connection_lost"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"  # no PINGRESP in time
    CERTIFICATE_EXPIRED = "certificate_expired"  # ended within a second of our own notAfter
    PROTOCOL_ERROR = "protocol_error"


class CredentialsReason(enum.StrEnum):
    """Why the device's own key, certificate or trust anchor cannot be used."""

    MISSING_FILE = "missing_file"
    PERMISSION_DENIED = "permission_denied"
    KEY_MISMATCH = "key_mismatch"
    BAD_TRUST_ANCHOR = "bad_trust_anchor"
    UNUSABLE_CERTIFICATE = "unusable_certificate"


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _connack_reasons() -> tuple[str, ...]:
    """paho's names of every CONNACK reason code (MQTT 3.1.1 and 5), in snake case."""
    probe = ReasonCode(PacketTypes.CONNACK, "Success")
    names = {
        _snake(name)
        for by_name in probe.names.values()
        for name, packets in by_name.items()
        if PacketTypes.CONNACK in packets and name != "Success"
    }
    return tuple(sorted(names))


CONNACK_REASONS = _connack_reasons()  # not_authorized, bad_user_name_or_password …
# MQTT 3.1.1's CONNACK return codes, named as paho names them.
CONNACK_V311_REASONS = {
    1: "unsupported_protocol_version",
    2: "client_identifier_not_valid",
    3: "server_unavailable",
    4: "bad_user_name_or_password",
    5: "not_authorized",
}

# Every reason a device can report, by outcome (and for a dropped session): what scenarios
# and reports compare, exactly.
REASONS_BY_OUTCOME: dict[str, tuple[str, ...]] = {
    ConnectOutcome.CONNECTED: (),
    ConnectOutcome.REJECTED_BY_BROKER: (
        *TLS_ALERTS,
        CLOSED_BY_BROKER,
        NO_SHARED_GROUP,
        NO_SHARED_SIGNATURE_ALGORITHM,
        OTHER,
    ),
    ConnectOutcome.BROKER_UNTRUSTED: tuple(UntrustedReason),
    ConnectOutcome.CONNACK_REFUSED: (*CONNACK_REASONS, CLOSED_AT_CONNECT),
    ConnectOutcome.TIMEOUT: (HANDSHAKE_TIMEOUT, NO_CONNACK),
    ConnectOutcome.NETWORK_ERROR: (CONNECTION_REFUSED, TLS_ERROR, OTHER),
    ConnectOutcome.CREDENTIALS_ERROR: tuple(CredentialsReason),
    DROPPED: (*DropReason, *TLS_ALERTS, OTHER),
}


def connack_reason(reason: ReasonCode) -> str:
    """``not_authorized`` for paho's CONNACK reason code "Not authorized"."""
    return _snake(reason.getName())


def drop_reason(reason: ReasonCode) -> str:
    """A paho DISCONNECT reason code (what ``on_disconnect`` gets) as a :class:`DropReason`."""
    name = reason.getName()
    if name == "Keep alive timeout":
        return DropReason.KEEPALIVE_TIMEOUT
    if name in ("Protocol error", "Malformed packet"):
        return DropReason.PROTOCOL_ERROR
    return DropReason.CONNECTION_LOST


def alert_name(exc: ssl.SSLError) -> str | None:
    """``certificate_revoked`` for an SSLError carrying the TLS alert SSLV3_ALERT_CERTIFICATE_REVOKED."""
    reason = getattr(exc, "reason", None) or ""
    for prefix in _ALERT_PREFIXES:
        if reason.startswith(prefix):
            return reason[len(prefix) :].lower()
    return None


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt, classified: its outcome, its reason and the words it came with."""

    outcome: ConnectOutcome
    reason: str
    message: str


_NEGOTIATION_REASONS = (NO_SHARED_GROUP, NO_SHARED_SIGNATURE_ALGORITHM)


def classify_tls_failure(exc: BaseException) -> Failure:
    """Map what the client saw during or right after the handshake to an outcome and reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        reason = _VERIFY_CODES.get(exc.verify_code, UntrustedReason.OTHER)
        return Failure(ConnectOutcome.BROKER_UNTRUSTED, reason, message)
    if isinstance(exc, ssl.SSLError) and exc.reason in _NEGOTIATION_REASONS:
        return Failure(ConnectOutcome.REJECTED_BY_BROKER, exc.reason, exc.args[-1])
    if isinstance(exc, ssl.SSLError):
        message = getattr(exc, "reason", None) or str(exc)
        alert = alert_name(exc)
        if alert is not None:
            known = alert if alert in TLS_ALERTS else OTHER
            return Failure(ConnectOutcome.REJECTED_BY_BROKER, known, message)
        return Failure(ConnectOutcome.NETWORK_ERROR, TLS_ERROR, message)
    if isinstance(exc, TimeoutError):
        return Failure(ConnectOutcome.TIMEOUT, HANDSHAKE_TIMEOUT, "no answer in time")
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return Failure(
            ConnectOutcome.REJECTED_BY_BROKER, CLOSED_BY_BROKER, "connection closed by the broker"
        )
    if isinstance(exc, ConnectionRefusedError):
        return Failure(ConnectOutcome.NETWORK_ERROR, CONNECTION_REFUSED, str(exc))
    return Failure(ConnectOutcome.NETWORK_ERROR, OTHER, str(exc) or type(exc).__name__)

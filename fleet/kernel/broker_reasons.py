"""The broker's vocabulary: how a connection attempt ended, why a session was ended, and the
events it logs. The broker (``broker/``) uses these values; the controller reads them in
scenario files and reports, so they live here, below both."""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """How a connection attempt ended. Topic-rights refusals are not attempts: they are counted
    per request in ``mtls_acl_denied_total{action}`` and logged as ``acl_denied`` events."""

    OK = "ok"
    NO_CERTIFICATE = "no_certificate"
    UNKNOWN_CA = "unknown_ca"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REVOKED = "revoked"
    ISSUER_REVOKED = "issuer_revoked"  # its issuing CA is on the root's CRL
    BAD_EKU = "bad_eku"
    CRL_STALE = "crl_stale"
    IDENTITY_MISMATCH = "identity_mismatch"
    ENV_MISMATCH = "env_mismatch"
    WILL_DENIED = "will_denied"  # the CONNECT's will topic is outside the certificate's rights
    TOO_MANY_SESSIONS = "too_many_sessions"  # a claim certificate past --max-claim-sessions
    POLICY_REFUSED = "policy_refused"  # the certificate misses the access policy's requirements
    OUTSIDE_WINDOW = "outside_window"  # the access policy's time windows keep it out now
    NO_SHARED_GROUP = "no_shared_group"  # no key-exchange group in common (--groups)
    # no signature scheme in common for a certificate (an ML-DSA one and a classical client)
    NO_SHARED_SIGNATURE_ALGORITHM = "no_shared_signature_algorithm"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    PROTOCOL_ERROR = "protocol_error"
    OTHER = "other"


class SessionEnd(enum.StrEnum):
    """Why the broker ended a live session (``session_closed`` events,
    ``mtls_sessions_closed_by_broker_total{reason}``)."""

    REVOKED = "revoked"
    EXPIRED = "expired"
    ISSUER_RETIRED = "issuer_retired"
    ISSUER_REVOKED = "issuer_revoked"
    TAKEOVER = "takeover"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    PROTOCOL_ERROR = "protocol_error"
    WINDOW_CLOSED = "window_closed"  # its access window ended (or a new policy closed it)


class BrokerEvent(enum.StrEnum):
    """Every structured event the broker logs (the ``event`` field of its JSON lines)."""

    REJECTED = "rejected"
    SESSION_CLOSED = "session_closed"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    ACL_DENIED = "acl_denied"
    ADMITTED_STALE_CRL = "admitted_stale_crl"
    CRL_INSTALLED = "crl_installed"
    CRL_REJECTED = "crl_rejected"
    CRL_STALE = "crl_stale"
    CRL_FETCH_FAILED = "crl_fetch_failed"
    CRL_FETCH_RECOVERED = "crl_fetch_recovered"
    TLS_ERROR = "tls_error"
    MQTT_ERROR = "mqtt_error"
    POLICY_INSTALLED = "policy_installed"
    POLICY_REJECTED = "policy_rejected"
    SUBSCRIPTION_REVOKED = "subscription_revoked"  # a live session's, by a narrower policy


# What a scenario's ``broker:`` may name for a device: an attempt's outcome, why its session
# ended, or one of the per-request events.
DEVICE_REASONS: tuple[str, ...] = tuple(
    dict.fromkeys([*Outcome, *SessionEnd, BrokerEvent.ACL_DENIED, BrokerEvent.ADMITTED_STALE_CRL])
)

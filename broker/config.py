"""Broker settings as a typed, validated dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from fleet.kernel.errors import UsageError
from fleet.kernel.identity import ENVIRONMENTS


class RevocationPolicy(enum.StrEnum):
    """What to do when the CRL's nextUpdate has passed (nobody published a fresh one)."""

    FAIL_CLOSED = "fail-closed"  # refuse every new handshake until a fresh CRL arrives
    FAIL_OPEN = "fail-open"  # admit, still enforce the revocations already known, and flag it


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What one client may hold in the broker (Mosquitto's names and defaults where it has them).

    ``max_queued``: messages waiting for a session, connected (behind the in-flight window) or
    offline (QoS 1 for a persistent session); past it new messages for it are dropped and
    counted. ``max_inflight``: messages being sent to it at once (QoS 1 ones until PUBACK).
    ``max_routing_backlog``: messages waiting to be routed broker-wide; past it, publishers'
    sockets are not read until it shrinks.
    """

    max_queued: int = 1000
    max_inflight: int = 20
    max_routing_backlog: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_queued", "max_inflight", "max_routing_backlog"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """How ``fleet broker`` runs. ``port=0`` picks a free port (tests)."""

    workspace: Path
    host: str = "127.0.0.1"
    port: int = 8883
    metrics_port: int | None = 9883
    env: str | None = None  # refuse certificates of the other environment when set
    handshake_timeout: float = 10.0
    revocation_policy: RevocationPolicy = RevocationPolicy.FAIL_CLOSED
    crl_poll_interval: float = 0.05
    crl_url: str | None = None  # fetch the CRL from here (fleet serve) instead of DIR/ca/crl.pem
    crl_url_interval: float = 5.0
    max_connect_bytes: int = 64 * 1024
    max_packet_bytes: int = 256 * 1024  # any packet, header included; larger ones close the link
    max_queued_messages: int = 1000
    max_inflight_messages: int = 20
    max_claim_sessions: int = 1000  # live sessions one claim certificate may hold at once
    event_log: bool = True  # one JSON line per rejection and per forced disconnect on stderr
    log_connections: bool = False  # also one event per admitted session and per session end
    policy: Path | None = None  # the access policy file (None: broker.policy.DEFAULT_POLICY)
    policy_poll_interval: float = 0.25  # how often the policy file is looked at (live reload)
    # key-exchange groups accepted, preferred first (fleet.kernel.tls.parse_groups); empty:
    # OpenSSL 4.0's defaults (X25519MLKEM768, X25519, P-256 … as the client offers)
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.env is not None and self.env not in ENVIRONMENTS:
            raise UsageError(f"invalid --env {self.env!r}: choose one of {', '.join(ENVIRONMENTS)}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"invalid --port {self.port}: use 0-65535")
        if self.handshake_timeout <= 0:
            raise UsageError("--handshake-timeout must be positive")
        if self.crl_poll_interval <= 0 or self.crl_url_interval <= 0:
            raise UsageError("the CRL poll interval must be positive")
        if self.crl_url is not None and not self.crl_url.startswith(("http://", "https://")):
            raise UsageError(f"invalid --crl-url {self.crl_url!r}: use an http:// or https:// URL")
        if not 16 <= self.max_packet_bytes <= 268_435_460:
            raise UsageError("--max-packet-size must be 16 bytes to 256 MiB (MQTT's own maximum)")
        _ = self.session_limits  # validates the queue limits
        if self.max_claim_sessions < 1:
            raise UsageError("--max-claim-sessions must be at least 1")

    @property
    def session_limits(self) -> SessionLimits:
        return SessionLimits(
            max_queued=self.max_queued_messages, max_inflight=self.max_inflight_messages
        )

"""The broker's side of lifecycle events (:mod:`fleet.kernel.lifecycle`): one JSON message on
``$fleet/events/<kind>/<id>`` for every admitted session, every session's end (with its reason
and length) and every refused attempt, published through the engine like any message (QoS 0,
not retained) so any subscriber the topic rights allow receives them."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Any

from broker.outcomes import Outcome
from fleet.kernel.lifecycle import Lifecycle, event_topic

if TYPE_CHECKING:
    from broker.connection import PeerConnection
    from broker.engine import MqttEngine
    from broker.packets import ConnectRequest

# Refusals decided by the certificate (the TLS handshake or the CRL in force right after it).
_TLS_OUTCOMES = frozenset(
    {
        Outcome.NO_CERTIFICATE,
        Outcome.UNKNOWN_CA,
        Outcome.EXPIRED,
        Outcome.NOT_YET_VALID,
        Outcome.REVOKED,
        Outcome.ISSUER_REVOKED,
        Outcome.BAD_EKU,
        Outcome.CRL_STALE,
    }
)


class LifecyclePublisher:
    def __init__(self, engine: MqttEngine) -> None:
        self._engine = engine

    def connected(self, peer: PeerConnection, request: ConnectRequest) -> None:
        self._publish(
            Lifecycle.CONNECTED,
            peer,
            clean_session=request.clean_session,
            keep_alive=request.keep_alive,
            group=peer.group,
            signature=peer.device_signature,
        )

    def disconnected(self, peer: PeerConnection, reason: str) -> None:
        seconds = max(0.0, time.monotonic() - peer.connected_at)
        self._publish(
            Lifecycle.DISCONNECTED, peer, reason=reason, session_seconds=round(seconds, 3)
        )

    def rejected(self, peer: PeerConnection, outcome: Outcome, detail: str | None) -> None:
        stage = "tls" if outcome in _TLS_OUTCOMES or not peer.handshaken else "connect"
        self._publish(
            Lifecycle.REJECTED,
            peer,
            stage=stage,
            reason=outcome.value,
            detail=detail,
            group=peer.group,
            signature=peer.device_signature,
        )

    def _publish(self, kind: Lifecycle, peer: PeerConnection, **fields: Any) -> None:
        serial = peer.serial
        identity = peer.identity
        payload: dict[str, Any] = {
            "event": kind.value,
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "device": peer.device_id,
            "serial": format(serial, "X") if serial is not None else None,
            "issuer": peer.issuer_name,
            "peer": peer.peer_address,
        }
        if identity is not None:
            payload |= {"role": identity.role, "tier": identity.tier, "env": identity.env}
        if peer.client_id is not None:
            payload["client_id"] = peer.client_id
        payload |= fields
        self._engine.publish(event_topic(kind, peer.device_id), json.dumps(payload).encode(), 0)

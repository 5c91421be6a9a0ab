"""amqtt plugins: identity and environment at CONNECT, topic rights on every request.

They stay thin: the policy lives in :class:`broker.server.FleetBroker` and :mod:`broker.acl`;
the plugins only find the connection amqtt hands them (``session.ssl_object``) and ask it.
"""

from __future__ import annotations

from dataclasses import dataclass

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker.connection import PeerConnection


def _peer(session: Session | None) -> PeerConnection | None:
    candidate = getattr(session, "ssl_object", None)
    return candidate if isinstance(candidate, PeerConnection) else None


class CertificateIdentityPlugin(BaseAuthPlugin):
    """amqtt's view of the broker's own decision: the connection's CONNECT was admitted (see
    :meth:`broker.server.FleetBroker.admit_connect`, which runs before amqtt reads it) and the
    session is bound to that connection."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool | None:
        peer = _peer(session)
        return peer is not None and peer.authorized and peer.client_id == session.client_id


def topic_allowed(session: Session | None, topic: str | None, action: Action | None) -> bool:
    """Publish, subscribe and receive rights from the certificate (see broker.acl); a refused
    publish or subscribe is counted and logged."""
    peer = _peer(session)
    if peer is None or peer.rights is None or topic is None:
        return False
    if action == Action.PUBLISH:
        allowed = peer.rights.may_publish(topic)
    elif action == Action.SUBSCRIBE:
        allowed = peer.rights.may_subscribe(topic)
    else:  # RECEIVE: defence in depth, a subscription was already vetted
        return peer.rights.may_receive(topic)
    if not allowed:
        peer.broker.acl_denied(peer, str(action), topic)
    return allowed


class TierTopicPlugin(BaseTopicPlugin):
    """amqtt's view of :func:`topic_allowed` (our broker core calls that directly)."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        return topic_allowed(session, topic, action)

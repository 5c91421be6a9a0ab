"""The MQTT 3.1.1 session engine: what happens to every packet after an admitted CONNECT.

A PUBLISH costs a parse, a rights check, a route (:mod:`broker.routing`) and, per subscriber,
one packet appended to its connection's output, which leaves as one TLS record per loop
iteration. Nothing here creates a task or a future: acknowledgements are looked up in plain
dicts, and the engine runs entirely inside the connection's ``data_received``.

Delivery follows MQTT 3.1.1: a message reaches a subscriber once, at the lower of the QoS it was
published with and the highest QoS granted to the subscriber's matching filters
[MQTT-3.3.5-1], [MQTT-3.8.4-6]; an outgoing QoS 1 or 2 message stays in flight until the client
acknowledges it, over as many connections as it takes, and is sent again with DUP set (or its
PUBREL) when a clean-session-0 client resumes [MQTT-4.4.0-1]; retained messages go out (RETAIN 1)
after a SUBSCRIBE only, everything else with RETAIN 0 [MQTT-3.3.1-6], [MQTT-3.3.1-9]; an incoming
QoS 2 message is routed once, when it first arrives, and its packet id remembered until PUBREL.

Each session sends at most ``max_inflight`` QoS 1/2 messages at once; the next
``max_queued`` wait in order (and QoS 0 ones wait too while the socket's send buffer is full);
past that new messages for it are dropped and counted (Mosquitto's max_inflight_messages and
max_queued_messages). A clean-session-0 session keeps its QoS 1 and 2 messages while offline, up
to the same bound [MQTT-3.1.2-5].
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from broker.acl import TopicRights
from broker.config import SessionLimits
from broker.packets import (
    PINGREQ,
    PINGRESP_PACKET,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    ConnackCode,
    ConnectRequest,
    Packet,
    encode_ack,
    encode_connack,
    encode_suback,
    parse_ack,
    parse_publish,
    parse_subscribe,
    parse_unsubscribe,
)
from broker.routing import RetainedMessages, SubscriptionIndex
from broker.sessions import InFlight, Link, Message, Session

log = logging.getLogger("mtls_fleet.broker.engine")

QUEUE_FULL = "queue_full"
OFFLINE_QUEUE_FULL = "offline_queue_full"
_REFUSED = 0x80

DropCounter = Callable[[str], None]


class MqttEngine:
    """Every session of the broker, the subscription index and the retained messages."""

    def __init__(self, limits: SessionLimits, on_drop: DropCounter | None = None) -> None:
        self.limits = limits
        self._on_drop: DropCounter = on_drop or (lambda reason: None)
        self.sessions: dict[str, Session] = {}
        self.subscriptions = SubscriptionIndex()
        self.retained = RetainedMessages()

    # -- connections ------------------------------------------------------------------------

    def connect(self, link: Link, request: ConnectRequest) -> None:
        """Bind an admitted CONNECT's session to ``link`` and answer CONNACK.

        Clean session 1 starts afresh (and discards any stored session); clean session 0
        resumes the stored one (CONNACK session present 1) or starts one to keep. A session
        another connection still holds is taken from it: that connection is released as if it
        had dropped (its will is published), and whatever it closes later changes nothing.
        """
        client_id = request.client_id
        stored = self.sessions.get(client_id)
        if stored is not None and stored.link is not None and stored.link is not link:
            self._release(stored, stored.link, graceful=False)
            stored = self.sessions.get(client_id)
        resumed = stored is not None and not request.clean_session
        if stored is not None and not resumed:
            self._discard(stored)
        session = stored if resumed and stored is not None else Session(client_id, clean=False)
        session.clean = request.clean_session
        session.link = link
        session.will = request.will
        link.mqtt_session = session
        self.sessions[client_id] = session
        link.write(encode_connack(ConnackCode.ACCEPTED, session_present=resumed))
        if resumed:
            self._resume(session, link)

    def disconnected(self, link: Link, *, graceful: bool) -> None:
        """``link`` ended (``graceful``: after a DISCONNECT, so no will)."""
        session = link.mqtt_session
        if session is not None and session.link is link:
            self._release(session, link, graceful=graceful)

    def writable(self, link: Link) -> None:
        """``link``'s send buffer drained: send what waited."""
        session = link.mqtt_session
        if session is not None and session.link is link:
            self._pump(session, link)

    def _release(self, session: Session, link: Link, *, graceful: bool) -> None:
        will = session.will
        session.link = None
        session.will = None
        link.mqtt_session = None
        if will is not None and not graceful:  # [MQTT-3.1.2-8]
            self.publish(will.topic, will.message, will.qos, retain=will.retain)
        if session.clean:
            self._discard(session)
            return
        queue = session.queue
        if queue and any(qos == 0 for _, qos in queue):  # QoS 0 is not kept for later
            kept = [(message, qos) for message, qos in queue if qos]
            queue.clear()
            queue.extend(kept)

    def _discard(self, session: Session) -> None:
        for topic_filter in session.subscriptions:
            self.subscriptions.remove(topic_filter, session)
        session.subscriptions.clear()
        session.queue = None
        session.inflight.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def _resume(self, session: Session, link: Link) -> None:
        """A stored session on a new connection: what the certificate in hand may no longer
        read is unsubscribed and dropped from what waits for it, the unacknowledged deliveries
        go out again, then the queue."""
        for topic_filter in self.narrow(session, link.rights):
            log.info("%s: dropping subscription %r on resume", session.client_id, topic_filter)
        for flight in session.inflight.values():
            if flight.released:
                link.write(encode_ack(PUBREL, flight.packet_id))
            else:
                link.write(flight.message.packet(flight.qos, flight.packet_id, dup=True))
        self._pump(session, link)

    def narrow(self, session: Session, rights: TopicRights | None) -> list[str]:
        """Unsubscribe ``session`` from what ``rights`` no longer let it read, and drop such
        messages from what waits for it or awaits its acknowledgement; the filters dropped."""
        dropped = []
        for topic_filter in list(session.subscriptions):
            if rights is None or not rights.may_subscribe(topic_filter):
                del session.subscriptions[topic_filter]
                self.subscriptions.remove(topic_filter, session)
                dropped.append(topic_filter)
        readable = rights.may_receive if rights is not None else (lambda topic: False)
        for packet_id, flight in list(session.inflight.items()):
            if not readable(flight.message.topic):
                del session.inflight[packet_id]
        if session.queue:
            kept = [(m, qos) for m, qos in session.queue if readable(m.topic)]
            session.queue.clear()
            session.queue.extend(kept)
        return dropped

    def shutdown(self) -> None:
        for session in list(self.sessions.values()):
            self._discard(session)

    # -- packets from a connected client ----------------------------------------------------

    def handle(self, link: Link, packet: Packet) -> None:
        """One checked packet (see :func:`broker.packets.packet_problem`) from ``link``."""
        session = link.mqtt_session
        if session is None or session.link is not link:
            return  # taken over: this connection is closing
        kind = packet.kind
        if kind == PUBLISH:
            self._on_publish(session, link, packet)
        elif kind in (PUBACK, PUBCOMP):
            flight = session.inflight.get(parse_ack(packet))
            if flight is not None and flight.qos == (1 if kind == PUBACK else 2):
                del session.inflight[flight.packet_id]
                self._pump(session, link)
        elif kind == PUBREC:
            packet_id = parse_ack(packet)
            flight = session.inflight.get(packet_id)
            if flight is not None and flight.qos == 2:
                flight.released = True
            link.write(encode_ack(PUBREL, packet_id))
        elif kind == PUBREL:
            packet_id = parse_ack(packet)
            session.released(packet_id)
            link.write(encode_ack(PUBCOMP, packet_id))
        elif kind == SUBSCRIBE:
            self._on_subscribe(session, link, packet)
        elif kind == UNSUBSCRIBE:
            packet_id, filters = parse_unsubscribe(packet.body)
            for topic_filter in filters:
                if session.subscriptions.pop(topic_filter, None) is not None:
                    self.subscriptions.remove(topic_filter, session)
            link.write(encode_ack(UNSUBACK, packet_id))
        elif kind == PINGREQ:
            link.write(PINGRESP_PACKET)

    def _on_publish(self, session: Session, link: Link, packet: Packet) -> None:
        publication = parse_publish(packet)
        qos, packet_id = publication.qos, publication.packet_id
        if qos == 2 and not session.first_arrival(packet_id):  # a resend: routed already
            link.write(encode_ack(PUBREC, packet_id))
            return
        topic = publication.topic
        if link.may_publish(topic):
            self.publish(topic, publication.payload, qos, retain=publication.retain)
        else:  # acknowledged all the same: MQTT 3.1.1 has no way to say no
            link.denied("publish", topic)
        if qos == 1:
            link.write(encode_ack(PUBACK, packet_id))
        elif qos == 2:
            link.write(encode_ack(PUBREC, packet_id))

    def _on_subscribe(self, session: Session, link: Link, packet: Packet) -> None:
        packet_id, requests = parse_subscribe(packet.body)
        rights = link.rights
        codes: list[int] = []
        granted: list[tuple[str, int]] = []
        for topic_filter, qos in requests:
            if rights is None or not rights.may_subscribe(topic_filter):
                link.denied("subscribe", topic_filter)
                codes.append(_REFUSED)
                continue
            # a SUBSCRIBE to a filter it has replaces that subscription [MQTT-3.8.4-3]
            session.subscriptions[topic_filter] = qos
            self.subscriptions.add(topic_filter, session, qos)
            codes.append(qos)
            granted.append((topic_filter, qos))
        link.write(encode_suback(packet_id, codes))
        for topic_filter, qos in granted:
            for message, kept_qos in self.retained.matching(topic_filter):
                self._deliver(session, message, min(qos, kept_qos))

    # -- routing ----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> int:
        """Route an application message; how many sessions it reached."""
        if retain:
            self.retained.keep(topic, payload, qos)
        subscribers = self.subscriptions.subscribers(topic)
        if not subscribers:
            return 0
        message = Message(topic, payload)
        deliver = self._deliver
        for session, granted in list(subscribers.items()):
            deliver(session, message, qos if qos < granted else granted)
        return len(subscribers)

    def _deliver(self, session: Session, message: Message, qos: int) -> None:
        link = session.link
        if link is None:
            if session.clean or not qos:
                return
            if session.queued() >= self.limits.max_queued:
                self._on_drop(OFFLINE_QUEUE_FULL)
                return
            session.enqueue(message, qos)
            return
        if not session.queue and not link.writing_paused:
            if not qos:
                link.write(message.packet(0, 0))
                return
            if len(session.inflight) < self.limits.max_inflight:
                self._send(session, link, message, qos)
                return
        if session.queued() >= self.limits.max_queued:
            self._on_drop(QUEUE_FULL)
            return
        session.enqueue(message, qos)

    def _send(self, session: Session, link: Link, message: Message, qos: int) -> None:
        packet_id = session.next_packet_id()
        session.inflight[packet_id] = InFlight(message, qos, packet_id)
        link.write(message.packet(qos, packet_id))

    def _pump(self, session: Session, link: Link) -> None:
        queue = session.queue
        if not queue:
            return
        limit = self.limits.max_inflight
        while queue and not link.writing_paused:
            message, qos = queue[0]
            if qos and len(session.inflight) >= limit:
                return
            queue.popleft()
            if qos:
                self._send(session, link, message, qos)
            else:
                link.write(message.packet(0, 0))

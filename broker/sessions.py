"""What the broker keeps per MQTT session: subscriptions, the messages on their way to it and
the QoS exchanges still open, over as many connections as a clean-session-0 client uses."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

from broker.packets import Will, encode_publish, encode_topic

if TYPE_CHECKING:
    from broker.acl import TopicRights


class Link(Protocol):
    """The connection a session is served over (see :class:`broker.connection.PeerConnection`)."""

    client_id: str | None
    rights: TopicRights | None
    mqtt_session: Session | None

    @property
    def writing_paused(self) -> bool:
        """The socket's send buffer is full: hold messages back until it drains."""
        ...

    def may_publish(self, topic: str) -> bool:
        """Whether the certificate's rights allow publishing to ``topic``."""
        ...

    def write(self, data: bytes) -> None:
        """Queue plaintext packets; they leave in one TLS record per loop iteration."""
        ...

    def denied(self, action: str, topic: str) -> None:
        """A publish or subscribe the certificate's rights refuse: count and log it."""
        ...


class Message:
    """One application message as routed: its topic encoded once, its QoS 0 packet built once
    (every QoS 0 subscriber is sent the same bytes)."""

    __slots__ = ("_qos0", "payload", "retain", "topic", "topic_field")

    def __init__(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.topic = topic
        self.topic_field = encode_topic(topic)
        self.payload = payload
        self.retain = retain
        self._qos0: bytes | None = None

    def packet(self, qos: int, packet_id: int, *, dup: bool = False) -> bytes:
        if qos:
            return encode_publish(
                self.topic_field, self.payload, qos, packet_id, retain=self.retain, dup=dup
            )
        if self._qos0 is None:
            self._qos0 = encode_publish(
                self.topic_field, self.payload, 0, 0, retain=self.retain, dup=False
            )
        return self._qos0


class InFlight:
    """An outgoing QoS 1 or 2 message sent and not yet acknowledged (for QoS 2: PUBREC seen
    once ``released``, PUBCOMP awaited)."""

    __slots__ = ("message", "packet_id", "qos", "released")

    def __init__(self, message: Message, qos: int, packet_id: int) -> None:
        self.message = message
        self.qos = qos
        self.packet_id = packet_id
        self.released = False


class Session:
    """One client id's session. ``link`` is its live connection (None while offline)."""

    __slots__ = (
        "_last_packet_id",
        "awaiting_pubrel",
        "clean",
        "client_id",
        "inflight",
        "link",
        "queue",
        "subscriptions",
        "will",
    )

    def __init__(self, client_id: str, *, clean: bool) -> None:
        self.client_id = client_id
        self.clean = clean
        self.link: Link | None = None
        self.will: Will | None = None
        self.subscriptions: dict[str, int] = {}  # filter -> granted QoS
        self.inflight: dict[int, InFlight] = {}  # packet id -> message, in the order sent
        # Made on first use (most sessions of a fleet never need them: ~0.8 KB each).
        self.queue: deque[tuple[Message, int]] | None = None  # waiting for the in-flight window
        self.awaiting_pubrel: set[int] | None = None  # incoming QoS 2 packet ids (PUBREC sent)
        self._last_packet_id = 0

    def enqueue(self, message: Message, qos: int) -> None:
        if self.queue is None:
            self.queue = deque()
        self.queue.append((message, qos))

    def queued(self) -> int:
        return len(self.queue) if self.queue is not None else 0

    def first_arrival(self, packet_id: int) -> bool:
        """Note an incoming QoS 2 PUBLISH; False when it is a resend of one not yet released."""
        if self.awaiting_pubrel is None:
            self.awaiting_pubrel = set()
        elif packet_id in self.awaiting_pubrel:
            return False
        self.awaiting_pubrel.add(packet_id)
        return True

    def released(self, packet_id: int) -> None:
        """PUBREL: the incoming QoS 2 message ``packet_id`` is done."""
        if self.awaiting_pubrel is not None:
            self.awaiting_pubrel.discard(packet_id)

    def next_packet_id(self) -> int:
        """A packet identifier no message in flight uses [MQTT-2.3.1-2]."""
        packet_id = self._last_packet_id
        while True:
            packet_id = packet_id % 65535 + 1
            if packet_id not in self.inflight:
                self._last_packet_id = packet_id
                return packet_id

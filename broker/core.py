"""amqtt's broker core with its subscription table indexed.

Stock amqtt 0.12 walks every subscription filter in the broker for every PUBLISH, for every
session that ends, for every session that *starts* (one await per filter, to replay retained
messages), and formats the whole table into a debug string after every SUBSCRIBE even with
debug logging off. With 10,000 devices each subscribed to its own commands topic, each of
those costs 10,000 steps and the broker falls behind. Here a message looks only at the filter
equal to its topic plus the wildcard filters, and a session's start and end only at that
client's own filters. Delivery rules are amqtt's; what each session may hold is bounded
(:mod:`broker.outbox`). Topic rights are checked by a direct call
(:func:`broker.plugins.topic_allowed`), not through a task per check. A resumed session is
bound to the connection that resumed it (amqtt keeps the first connection's).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action
from amqtt.errors import BrokerError as AmqttBrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage, Session
from transitions import MachineError

from broker.config import SessionLimits
from broker.delivery import own_deliveries
from broker.outbox import DropCounter, Outbox
from broker.plugins import topic_allowed

_REFUSED = 0x80
# The QoS of the PUBLISH being routed, set by the task that received it (amqtt does not pass it
# on: it delivered every message at the subscription's QoS, never lower than it was sent).
_PUBLISHED_QOS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "published_qos", default=None
)
_TAKEOVER_WAIT_SECONDS = 5.0
FLEET_API_PREFIX = "$fleet/"


def _is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class _SubscriptionTable(dict[str, list[tuple[Session, int]]]):
    """amqtt logs ``repr(self._subscriptions)`` after every SUBSCRIBE; keep that cheap."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


class SessionStates:
    """The state machine amqtt builds for every session, without building one per session.

    amqtt 0.12 constructs a ``transitions.Machine`` (about 0.25 ms) for each session. This
    class has the same states (new, connected, disconnected), the same transitions, the same
    enter callbacks and the same error (``MachineError``) on an invalid trigger, which amqtt
    relies on to detect a session take-over.
    """

    __slots__ = ("_session", "state")

    _CONNECT_FROM = frozenset({"new", "disconnected"})
    _DISCONNECT_FROM = frozenset({"new", "connected", "disconnected"})

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> bool:
        return self._trigger("connect", self._CONNECT_FROM, "connected")

    def disconnect(self) -> bool:
        return self._trigger("disconnect", self._DISCONNECT_FROM, "disconnected")

    def _trigger(self, event: str, sources: frozenset[str], dest: str) -> bool:
        if self.state not in sources:
            raise MachineError(f"Can't trigger event {event} from state {self.state}!")
        self.state = dest
        getattr(
            self._session, f"_on_enter_{dest}"
        )()  # amqtt's enter callbacks, as transitions calls them
        return True

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


def _light_init_states(session: Session) -> None:
    session.transitions = SessionStates(session)


class IndexedBroker(Broker):
    """amqtt's ``Broker`` whose fan-out and clean-up cost what the topic needs, not the fleet."""

    def __init__(
        self,
        *args: Any,
        limits: SessionLimits | None = None,
        on_drop: DropCounter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits or SessionLimits()
        self._on_drop: DropCounter = on_drop or (lambda reason: None)
        # Sessions are created deep inside amqtt's protocol handler: the light state machine
        # can only be installed on the class (for every amqtt session of this process).
        Session._init_states = _light_init_states
        self._subscriptions = _SubscriptionTable()
        self._wildcard_filters: set[str] = set()
        self._filters_by_client: dict[str, set[str]] = {}

    def routing_backlogged(self) -> bool:
        """Whether more messages wait to be routed than ``limits.max_routing_backlog``."""
        return bool(self._broadcast_queue.qsize() > self.limits.max_routing_backlog)

    def outbox(self, session: Session) -> Outbox:
        box: Outbox | None = getattr(session, "fleet_outbox", None)
        if box is None:
            box = Outbox(session, self._get_handler, self.limits, self._on_drop)
            session.fleet_outbox = box
        return box

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's, then the session (new or resumed) belongs to the connection in hand.

        amqtt resumes a stored session with the connection object of whoever *created* it, so
        the identity and rights read from ``session.ssl_object`` would be another connection's.
        The broker admitted this CONNECT for this certificate (same identity) before amqtt saw
        it; here the session is bound to it, and the will's retain flag (which amqtt forgets
        on resumption) is taken from the CONNECT.
        """
        handler, session = await super()._initialize_client_session(
            reader, writer, remote_address, remote_port
        )
        own_deliveries(handler)  # unacknowledged deliveries kept and resent (broker/delivery.py)
        peer = writer.get_ssl_info()
        session.ssl_object = peer
        request = getattr(peer, "connect_request", None)
        if request is not None:
            session.will_retain = request.will.retain if request.will is not None else False
        if hasattr(peer, "amqtt_session"):
            peer.amqtt_session = session
        return handler, session

    async def _cleanup_session(self, client_id: str) -> None:
        entry = self._sessions.get(client_id)
        if entry is not None:
            self.outbox(entry[0]).cancel()
        await super()._cleanup_session(client_id)

    async def shutdown(self) -> None:
        for session, _handler in list(self._sessions.values()):
            self.outbox(session).cancel()
        await super().shutdown()

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        """A message for an offline persistent session, kept up to its queue bound."""
        message = RetainedApplicationMessage(
            broadcast["session"], broadcast["topic"], broadcast["data"], qos
        )
        self.outbox(target_session).keep_offline(message)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        code: int = await super().add_subscription(subscription, session)
        if code != _REFUSED:
            topic_filter = subscription[0]
            entries = self._subscriptions[topic_filter]
            for index, (subscriber, _qos) in enumerate(entries):
                if subscriber.client_id == session.client_id:
                    # a SUBSCRIBE to a filter it has replaces that subscription [MQTT-3.8.4-3]
                    # (amqtt kept the first one's QoS)
                    entries[index] = (session, code)
            if _is_wildcard(topic_filter):
                self._wildcard_filters.add(topic_filter)
            self._filters_by_client.setdefault(session.client_id, set()).add(topic_filter)
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        filters = self._filters_by_client.get(session.client_id)
        if filters is not None:
            filters.discard(a_filter)
            if not filters:
                del self._filters_by_client[session.client_id]
        if not self._subscriptions.get(a_filter, True):
            del self._subscriptions[a_filter]
            self._wildcard_filters.discard(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        for topic_filter in list(self._filters_by_client.get(session.client_id, ())):
            self._del_subscription(topic_filter, session)

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        """amqtt 0.12's session life cycle, replaying retained messages for the session's own
        subscriptions instead of awaiting once per filter of the whole broker.

        A takeover that resumes the same session (clean session 0) waits for the older
        connection's loop to end: amqtt lets that loop mark the shared session disconnected
        *after* the new connection took it, so the new one would never be sent anything.
        """
        authenticated = await self._authenticate(
            client_session, self.listeners_config[listener_name]
        )
        if client_session.client_id is None:
            raise AmqttBrokerError("Client ID was not correctly created/set.")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    await self._end_older_connection(client_session)
                    if client_session.transitions.is_connected():
                        break  # amqtt's own take-over (the older loop did not end in time)
                    continue
                self.logger.warning(
                    f"Client {client_session.client_id} is reconnecting too quickly, make it wait"
                )
                await asyncio.sleep(1)
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            await self._forget_clean_session(client_session)  # amqtt would keep it "connected"
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )
        await handler.start()
        loop_ended = client_session.fleet_loop_ended = asyncio.Event()
        try:
            await self._serve_session(client_session, handler)
        finally:
            loop_ended.set()

    async def _serve_session(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """What a resumed session kept while offline is delivered as it was published, with
        RETAIN 0: it matched an established subscription [MQTT-3.3.1-9]. Retained messages are
        sent for a SUBSCRIBE only [MQTT-3.3.1-6]; amqtt replayed them at every resumption too,
        so a message published while the device was away arrived twice."""
        queued = client_session.retained_messages
        outbox = self.outbox(client_session)
        while not queued.empty():
            message = queued.get_nowait()
            outbox.put(message.topic, message.data, message.qos)
        await self._client_message_loop(client_session, handler)
        await self._forget_clean_session(client_session)

    async def _end_older_connection(self, session: Session) -> None:
        """Take a session over from its older connection and wait until that one let go."""
        _old_session, old_handler = self._sessions[session.client_id]
        loop_ended: asyncio.Event | None = getattr(session, "fleet_loop_ended", None)
        await old_handler.handle_connection_closed()
        if loop_ended is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loop_ended.wait(), _TAKEOVER_WAIT_SECONDS)
                return
        await old_handler.stop()

    async def _forget_clean_session(self, session: Session) -> None:
        """Drop a clean session's state when its connection ends [MQTT-3.1.2-6].

        amqtt leaves it to a monitor that sweeps every session once a second: after a wave of
        disconnects it then tears thousands down in one go and stalls the loop. One at a time,
        here, the cost is spread over the disconnections. A session that a takeover replaced is
        not the current one for its client id, and is left alone (its successor owns the id).
        """
        if not (session.clean_session or session.is_anonymous):
            return
        current = self._sessions.get(session.client_id)
        if current is not None and current[0] is session:
            await self._cleanup_session(session.client_id)

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """Our topic rights, called directly: amqtt's plugin manager wraps every check (one
        per message published and one per copy delivered) in a task of its own."""
        return topic_allowed(session, topic, action)

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        """amqtt closes any client that publishes to a ``$`` topic; the control plane's API
        lives under ``$fleet/`` (like AWS IoT's ``$aws/``), so those go through the topic
        rights like any other message. Everything else is amqtt's, unchanged."""
        message = wait_deliver.result()
        _PUBLISHED_QOS.set(getattr(message, "qos", None))  # for the routing of this message
        topic = getattr(message, "topic", None) or ""
        if not topic.startswith(FLEET_API_PREFIX) or "+" in topic or "#" in topic:
            return bool(
                await super()._handle_message_delivery(client_session, handler, wait_deliver)
            )
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=message
        )
        if await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=message
            )
            await self._broadcast_message(client_session, topic, message.data)
        return True

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        """amqtt's, keeping the QoS the message was published with (a will's is ``force_qos``)."""
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        elif (published := _PUBLISHED_QOS.get()) is not None:
            broadcast["published_qos"] = published
        await self._broadcast_queue.put(broadcast)

    def _matching_filters(self, topic: str) -> list[str]:
        filters = [topic] if topic in self._subscriptions else []
        for topic_filter in list(self._wildcard_filters):
            if topic_filter not in self._subscriptions:
                self._wildcard_filters.discard(topic_filter)
            elif self._matches(topic, topic_filter):
                filters.append(topic_filter)
        return filters

    async def _run_broadcast(
        self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]
    ) -> None:
        """amqtt's delivery of one queued message, over the matching filters only."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for topic_filter in self._matching_filters(topic):
            for target_session, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                sent_qos = broadcast.get("qos", broadcast.get("published_qos"))
                # the lower of the QoS it was published with and the one granted [MQTT-3.8.4-6]
                qos = sub_qos if sent_qos is None else min(sent_qos, sub_qos)
                if not await self._topic_filtering(
                    target_session, topic=topic, action=Action.RECEIVE
                ):
                    continue
                connected = target_session.transitions.state == "connected"
                if (
                    not connected
                    and not target_session.clean_session
                    and qos in (QOS_1, QOS_2)
                    and not target_session.is_anonymous
                ):
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                if not connected:
                    continue
                if self.logger.isEnabledFor(logging.DEBUG):
                    self.logger.debug(f"Broadcasting on {topic!r} to {target_session.client_id}")
                self.outbox(target_session).put(topic, broadcast["data"], qos)

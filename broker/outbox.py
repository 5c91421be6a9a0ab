"""A session's outgoing messages, bounded: an in-flight window and a queue behind it.

amqtt starts one task per message per subscriber and never says no: a subscriber that stops
reading (or a publisher that floods it) grows the broker without limit. Here each session
sends at most ``max_inflight`` messages at once; the next ``max_queued`` wait in order; past
that new messages for it are dropped and counted (Mosquitto's max_inflight_messages and
max_queued_messages). A session that went offline keeps its QoS 1 and 2 messages, up to the
same bound, for its next connection [MQTT-3.1.2-5]; QoS 0 ones are dropped, as amqtt does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from amqtt.broker import RetainedApplicationMessage

from broker.config import SessionLimits

log = logging.getLogger("mtls_fleet.broker.outbox")

QUEUE_FULL = "queue_full"
OFFLINE_QUEUE_FULL = "offline_queue_full"

Message = tuple[str, bytes, int]  # topic, payload, QoS
DropCounter = Callable[[str], None]


class Outbox:
    """The messages on their way to one amqtt session."""

    __slots__ = ("_active", "_handler_of", "_limits", "_on_drop", "_session", "_tasks", "_waiting")

    def __init__(
        self,
        session: Any,
        handler_of: Callable[[Any], Any],
        limits: SessionLimits,
        on_drop: DropCounter,
    ) -> None:
        self._session = session
        self._handler_of = handler_of
        self._limits = limits
        self._on_drop = on_drop
        self._waiting: deque[Message] = deque()
        self._active = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._waiting) + self._active

    def put(self, topic: str, data: bytes, qos: int) -> None:
        if len(self._waiting) >= self._limits.max_queued:
            self._on_drop(QUEUE_FULL)
            return
        self._waiting.append((topic, data, qos))
        self._pump()

    def keep_offline(self, message: Any) -> bool:
        """Store a message for an offline persistent session (False: its queue is full)."""
        queue = self._session.retained_messages
        if queue.qsize() >= self._limits.max_queued:
            self._on_drop(OFFLINE_QUEUE_FULL)
            return False
        queue.put_nowait(message)
        return True

    def cancel(self) -> None:
        self._waiting.clear()
        for task in list(self._tasks):
            task.cancel()

    def _pump(self) -> None:
        while self._waiting and self._active < self._limits.max_inflight:
            session = self._session
            if session.transitions.state != "connected":
                self._park_while_offline()
                return
            handler = self._handler_of(session)
            if handler is None:
                return
            topic, data, qos = self._waiting.popleft()
            self._active += 1
            task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _park_while_offline(self) -> None:
        """The session went away with messages queued: keep what MQTT says must be kept."""
        keep = not self._session.clean_session
        while self._waiting:
            topic, data, qos = self._waiting.popleft()
            if keep and qos > 0:
                self.keep_offline(RetainedApplicationMessage(None, topic, data, qos))

    def _sent(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._active -= 1
        if not task.cancelled() and (error := task.exception()) is not None:
            log.debug("delivery to %s failed: %r", self._session.client_id, error)
        self._pump()

"""Outgoing QoS 1 and 2 deliveries that outlive their connection, as MQTT 3.1.1 requires.

amqtt 0.12 waits 5 s for a PUBACK (PUBREC, PUBCOMP) and then forgets the message, and forgets
it too when the connection ends: a persistent session that comes back finds nothing to resend.
Here an outgoing message stays in the session's in-flight table until the client acknowledges
it, however long that takes and over as many connections as it takes; when a clean-session-0
client comes back, every unacknowledged PUBLISH is sent again with DUP set, and a QoS 2 message
whose PUBREC arrived is continued with its PUBREL [MQTT-4.4.0-1], [MQTT-3.3.1-1]. Waiting costs a
slot of the session's in-flight window (``--max-inflight-messages``), like Mosquitto's.

The rest of the protocol handler is amqtt's: :func:`own_deliveries` gives one handler this
class (it adds behaviour, no state), so nothing changes for any other handler in the process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import OUTGOING
from amqtt.mqtt.pubrel import PubrelPacket

log = logging.getLogger("mtls_fleet.broker.delivery")

AppMessage = Any  # amqtt's IncomingApplicationMessage or OutgoingApplicationMessage (untyped)


class FleetProtocolHandler(BrokerProtocolHandler):
    """amqtt's broker handler, with the outgoing QoS 1 and 2 flows of this module."""

    async def _handle_qos1_message_flow(self, app_message: AppMessage) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
            return
        session, packet_id = self._session_and_id(app_message)
        session.inflight_out[packet_id] = app_message
        publish = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        app_message.publish_packet = publish  # sent once: any resend carries DUP
        app_message.puback_packet = await self._send_and_wait(
            publish, self._puback_waiters, packet_id
        )
        session.inflight_out.pop(packet_id, None)  # acknowledged: only now is it delivered

    async def _handle_qos2_message_flow(self, app_message: AppMessage) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos2_message_flow(app_message)
            return
        session, packet_id = self._session_and_id(app_message)
        session.inflight_out[packet_id] = app_message
        if app_message.pubrel_packet is None:  # PUBREC not seen yet: (re)send the PUBLISH
            publish = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            app_message.publish_packet = publish
            app_message.pubrec_packet = await self._send_and_wait(
                publish, self._pubrec_waiters, packet_id
            )
            app_message.pubrel_packet = PubrelPacket.build(packet_id)
        app_message.pubcomp_packet = await self._send_and_wait(
            app_message.pubrel_packet, self._pubcomp_waiters, packet_id
        )
        session.inflight_out.pop(packet_id, None)

    async def _retry_deliveries(self) -> None:
        """Resend what the session still has in flight, without holding up the connection
        (amqtt waits up to 10 s for every acknowledgement here before serving the client)."""
        session = self.session
        if session is None:
            return
        pending: list[Any] = [*session.inflight_in.values(), *session.inflight_out.values()]
        for message in pending:
            task = asyncio.ensure_future(self._handle_message_flow(message))
            _RETRIES.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(_retry_done)

    def _session_and_id(self, app_message: AppMessage) -> tuple[Any, int]:
        if self.session is None or app_message.packet_id is None:
            raise ValueError("an outgoing QoS 1 or 2 message needs a session and a packet id")
        return self.session, app_message.packet_id

    async def _send_and_wait(self, packet: Any, waiters: dict[int, Any], packet_id: int) -> Any:
        """Send ``packet`` and wait for its answer, for as long as the connection lives (its end
        cancels the wait and leaves the message in flight for the next connection)."""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiters[packet_id] = waiter
        try:
            await self._send_packet(packet)
            return await waiter
        finally:
            if waiters.get(packet_id) is waiter:
                del waiters[packet_id]


def own_deliveries(handler: BrokerProtocolHandler) -> BrokerProtocolHandler:
    """Give ``handler`` (made by amqtt for one connection) the delivery flows of this module."""
    handler.__class__ = FleetProtocolHandler
    return handler


_RETRIES: set[asyncio.Future[Any]] = set()


def _retry_done(task: asyncio.Future[Any]) -> None:
    _RETRIES.discard(task)
    if not task.cancelled() and (error := task.exception()) is not None:
        log.debug("redelivery failed: %r", error)

"""The control plane as an MQTT client: it answers enrollment and renewal requests on a broker.

It connects with the workspace's admin certificate (``DIR/admin/``, client id
``admin:control-plane``) to any broker that trusts the fleet's CA (ours, Mosquitto …),
subscribes to the request topics of :mod:`fleet.kernel.mqtt_api` and publishes each answer on the
request's reply topic. paho's network thread only queues messages; one worker thread answers
them in order, so a slow signature never stalls the connection's keepalive. The session is
persistent (clean session off): requests published while the control plane reconnects wait
for it at the broker.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry, Counter

from fleet.controlplane.event_feed import EventFeed
from fleet.kernel.errors import FleetError
from fleet.kernel.lifecycle import EVENTS_FILTER, is_event_topic
from fleet.kernel.mqtt_api import (
    ADMIN_CLIENT_PREFIX,
    PROVISION,
    REQUEST_SUBSCRIPTIONS,
    Reply,
    encode,
    parse_request_topic,
    reply_topic,
)
from fleet.kernel.tls import device_tls_context
from fleet.store.certificate_requests import CertificateRequests
from fleet.store.workspace import ADMIN_NAME, Workspace, ensure_admin_certificate

log = logging.getLogger("mtls_fleet.control_plane.mqtt")


class BrokerUnreachable(FleetError):
    """The control plane could not connect to (or subscribe at) its broker."""


class CertificateService:
    """Answers requests arriving through the broker at ``host:port`` until :meth:`stop`."""

    def __init__(
        self,
        workspace: Workspace,
        requests: CertificateRequests,
        *,
        host: str,
        port: int,
        connect_timeout: float = 10.0,
        metrics: CollectorRegistry | None = None,
        events: EventFeed | None = None,
    ) -> None:
        ensure_admin_certificate(workspace)
        paths = workspace.paths
        self.requests = requests
        self.host = host
        self.port = port
        self._timeout = connect_timeout
        self._ready = threading.Event()
        self._pending: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._connected = False
        self.answered = 0
        self.events = events
        self._events_mid: int | None = None
        self.events_problem: str | None = None  # why the broker's lifecycle events do not come
        self.worker_failures = Counter(
            "fleet_request_worker_failures",
            "Requests whose handling failed unexpectedly (answered internal_error), and worker "
            "restarts",
            ["what"],
            registry=metrics,
        )
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{ADMIN_CLIENT_PREFIX}{ADMIN_NAME}",
            clean_session=False,
        )
        self._client.tls_set_context(
            device_tls_context(
                paths.root_cert, paths.admin_cert, paths.admin_key, device_id=ADMIN_NAME
            )
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    def start(self) -> None:
        """Connect and subscribe; raises :class:`BrokerUnreachable` if that fails in time."""
        self._start_worker()
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as exc:
            self.stop()
            raise BrokerUnreachable(
                f"control plane: cannot connect to mqtts://{self.host}:{self.port} ({exc}); "
                "is the broker running, and does it trust this fleet's CA?"
            ) from exc
        self._client.loop_start()
        if not self._ready.wait(self._timeout):
            self.stop()
            raise BrokerUnreachable(
                f"control plane: no CONNACK/SUBACK from mqtts://{self.host}:{self.port} within "
                f"{self._timeout:g} s (does the broker admit the admin certificate?)"
            )

    def health_problems(self) -> list[str]:
        """Why requests are not being answered now (empty: they are). A dead worker is
        restarted here too (and counted), so a health check also heals."""
        problems = []
        if not self._connected:
            problems.append(f"not connected to the broker mqtts://{self.host}:{self.port}")
        if self._worker is None or not self._worker.is_alive():
            problems.append("the request worker had stopped; restarted")
            self.worker_failures.labels("restart").inc()
            self._start_worker()
        return problems

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 1 (an alert); False when paho could not queue it."""
        return self._client.publish(topic, payload, qos=1).rc == mqtt.MQTT_ERR_SUCCESS

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._answer_requests, name="requests", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._pending.put(None)
        if self._worker is not None:
            self._worker.join(10)

    # -- paho callbacks (paho's network thread) ---------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("the broker refused the control plane's CONNECT: %s", reason)
            return
        self._connected = True
        client.subscribe([(topic, 1) for topic in REQUEST_SUBSCRIPTIONS])
        if self.events is not None:  # apart: a broker that refuses these still gets answers
            self._events_mid = client.subscribe(EVENTS_FILTER, 0)[1]

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if mid == self._events_mid:
            self.events_problem = f"the broker refused {EVENTS_FILTER}" if refused else None
            if refused:
                log.warning("no lifecycle events: the broker refused %s", EVENTS_FILTER)
            return
        if refused:
            log.error("the broker refused the request subscriptions: %s", ", ".join(refused))
            return
        log.info("answering certificate requests on mqtts://%s:%d", self.host, self.port)
        self._ready.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._connected = False
        if not self._stopping:
            log.warning("control plane lost the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if is_event_topic(message.topic):
            if self.events is not None:
                self.events.receive(message.topic, bytes(message.payload))
            return
        self._pending.put(message)

    # -- the worker -------------------------------------------------------------------------

    def _answer_requests(self) -> None:
        """Answer queued requests in order until :meth:`stop`. Each one is handled in
        isolation: whatever goes wrong with one is answered ``internal_error``, counted and
        logged, and the next one is served."""
        while (message := self._pending.get()) is not None:
            parsed = parse_request_topic(message.topic)
            if parsed is None:
                continue
            kind, subject = parsed
            try:
                reply = self._answer(kind, subject, bytes(message.payload))
            except Exception as exc:  # a defect of ours: the device still gets an answer
                log.exception("answering %s", message.topic)
                self.worker_failures.labels("request").inc()
                reply = Reply("", "refused", reason="internal_error", message=str(exc)[:200])
            self._client.publish(reply_topic(kind, subject), encode(reply), qos=1)
            self.answered += 1

    def _answer(self, kind: str, subject: str, payload: bytes) -> Reply:
        if kind == PROVISION:
            return self.requests.enroll(subject, payload)
        return self.requests.renew(subject, payload)

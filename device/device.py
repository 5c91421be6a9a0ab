"""A simulated device: paho-mqtt with its own certificate, driven from an asyncio loop.

paho exposes socket callbacks for exactly this: the loop watches each device's socket and
calls paho when it is readable or writable; one timer per loop runs paho's keepalive work for
every device. No thread per device.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from device.connect import TlsConnection, open_device_tls
from device.outcomes import (
    CLOSED_AT_CONNECT,
    CLOSED_BY_BROKER,
    NO_CONNACK,
    TLS_ALERTS,
    ConnectAttempt,
    ConnectOutcome,
    DropReason,
    UntrustedReason,
    alert_name,
    classify_tls_failure,
    connack_reason,
    drop_reason,
)
from device.paho_driver import PahoDriver, PreparedSocketClient
from device.requests import prepare_renewal
from device.settings import DeviceSettings, DeviceStats
from fleet.kernel.errors import CertificateError
from fleet.kernel.identity import valid_until
from fleet.kernel.identity_files import install_identity
from fleet.kernel.mqtt_api import (
    RENEW,
    ProtocolError,
    Reply,
    decode_reply,
    reply_topic,
    request_topic,
)
from fleet.kernel.tls import DeviceTls, device_tls, spki_pin


def load_credentials(
    settings: DeviceSettings, cert: Path | None = None, key: Path | None = None
) -> DeviceTls:
    """What the device of ``settings`` connects with (its files, or ``cert`` and ``key``): its
    trust anchor, whether it presents a certificate, the groups it offers."""
    return device_tls(
        settings.trust_anchor,
        cert or settings.cert,
        key or settings.key,
        device_id=settings.device_id,
        present_certificate=settings.present_certificate,
        groups=settings.groups,
    )


class Device:
    """One device: connect with classification, publish telemetry, reconnect with backoff.

    Create it inside the running event loop that will drive it.
    """

    def __init__(
        self,
        settings: DeviceSettings,
        driver: PahoDriver,
        *,
        context: DeviceTls | None = None,
        connect_gate: asyncio.Semaphore | None = None,
        on_attempt: Callable[[ConnectAttempt], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.stats = DeviceStats()
        self._driver = driver
        self._context = context
        self._gate = connect_gate  # caps handshakes in flight across a swarm
        self._on_attempt = on_attempt
        self._on_drop = on_drop  # a live session ended without us asking (with the reason)
        self._all_acknowledged = asyncio.Event()
        self._all_acknowledged.set()
        self._inflight: dict[int, float] = {}  # QoS > 0 mid -> when it was sent, until acked
        self._subscriptions: dict[int, asyncio.Future[bool]] = {}
        self._leaving = False  # a disconnect we asked for is not a drop
        self._planned_drop = False
        self._loop = asyncio.get_running_loop()
        self._client = self._new_client()
        self._connack: asyncio.Future[tuple[str, str | None]] | None = None
        self._disconnected = asyncio.Event()
        self._tls_error: str | None = None  # the TLS alert that ended the connection
        self._local_address: str | None = None  # of the attempt in progress, once TCP is up
        self._not_after: float | None = None  # of the certificate in use, read at a drop
        self._seq = 0
        self._reply_topics: set[str] = set()  # subscribed in this session
        self._replies: dict[str, asyncio.Future[Reply]] = {}  # request id -> its answer
        self._request_mids: set[int] = set()
        self.connected = False

    @property
    def device_id(self) -> str:
        return self.settings.device_id

    # -- certificates -----------------------------------------------------------------------

    def context(self) -> DeviceTls:
        """The TLS credentials, loaded on first use and reused across reconnects."""
        if self._context is None:
            self._context = load_credentials(self.settings)
        return self._context

    def swap_certificate(self, cert: Path, key: Path) -> None:
        """Use a renewed certificate for the next handshake; the live session is kept."""
        self._context = load_credentials(self.settings, cert, key)
        self._not_after = None

    def _certificate_expires_at(self) -> float:
        """When our certificate stops being valid (UNIX time), read once per certificate."""
        if self._not_after is None:
            cert = x509.load_pem_x509_certificate(self.settings.cert.read_bytes())
            self._not_after = valid_until(cert).timestamp()
        return self._not_after

    def _why_dropped(self, reason: Any) -> str:
        """The reason of a drop: the TLS alert if one came, ``certificate_expired`` when the
        session ended within a second of our own notAfter (a broker closes sessions then, and
        MQTT 3.1.1 gives it no way to say so), else what paho saw."""
        if self._tls_error is not None:
            return self._tls_error
        try:
            if abs(time.time() - self._certificate_expires_at()) <= 1.0:
                return DropReason.CERTIFICATE_EXPIRED
        except (OSError, ValueError):
            pass  # the file is gone or unreadable: say what paho saw
        return drop_reason(reason)

    # -- paho wiring ------------------------------------------------------------------------

    def _new_client(self) -> PreparedSocketClient:
        s = self.settings
        protocol = (
            MQTTProtocolVersion.MQTTv5 if s.mqtt_version == 5 else MQTTProtocolVersion.MQTTv311
        )
        client = PreparedSocketClient(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id or s.device_id,
            protocol=protocol,
            reconnect_on_failure=False,
        )
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.connect_async(s.host, s.port, keepalive=s.keepalive)
        return client

    def _socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.add_reader(sock, self._readable, sock)
        self._driver.add(client)

    def _readable(self, sock: TlsConnection) -> None:
        # Bytes TLS has already decrypted do not wake the selector: drain them too.
        while self._client.loop_read() == mqtt.MQTT_ERR_SUCCESS and sock.pending():
            pass

    def _socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._driver.discard(client)

    def _register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Through the selector, not at once: a broker that refuses our certificate after a TLS
        # 1.3 handshake sends its alert and closes; writing CONNECT before reading that alert
        # makes the kernel answer the close with a reset that destroys it (Mosquitto: 20 of 28
        # refusals then read as connection_closed instead of unknown_ca).
        self._loop.add_writer(sock, client.loop_write)

    def _unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self._connack is not None and not self._connack.done():
            # connected from this moment: a loss before _connect resumes is then a drop, not a
            # dead session taken for a live one
            self.connected = not reason.is_failure
            self._connack.set_result(
                ("refused", connack_reason(reason)) if reason.is_failure else ("ok", None)
            )

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self._connack is not None and not self._connack.done():
            # refused after the handshake: by a TLS alert, or closed without a word
            self._connack.set_result(("lost", self._tls_error or CLOSED_BY_BROKER))
        if self.connected:
            self.connected = False
            self._reply_topics.clear()
            self._planned_drop = self._leaving
            self._leaving = False
            if not self._planned_drop:  # a drop: say why (a planned leave needs no reason)
                detail = self._why_dropped(reason)
                self.stats.disconnects.append(detail)
                if self._on_drop is not None:
                    self._on_drop(detail)
        self._disconnected.set()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        if mid in self._request_mids:  # a request to the control plane, not telemetry
            self._request_mids.discard(mid)
            return
        self.stats.acknowledged += 1
        self._inflight.pop(mid, None)
        if not self._inflight:
            self._all_acknowledged.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        if message.topic in self._reply_topics:
            self._take_reply(message.payload)
            return
        self.stats.received += 1
        self.stats.received_topics[message.topic] += 1

    def _take_reply(self, payload: bytes) -> None:
        try:
            reply = decode_reply(payload)
        except ProtocolError:
            return  # not an answer to us; a waiter times out rather than trusting it
        waiter = self._replies.pop(reply.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        granted = not any(reason.is_failure for reason in reasons)
        waiter = self._subscriptions.pop(mid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(granted)

    def _note_tls_error(self, exc: ssl.SSLError) -> None:
        alert = alert_name(exc)
        self._tls_error = alert if alert in TLS_ALERTS else None

    # -- connecting -------------------------------------------------------------------------

    async def connect(self) -> ConnectAttempt:
        """One attempt: TCP, TLS, CONNECT/CONNACK, classified and timed."""
        if self._gate is None:
            return await self._connect()
        async with self._gate:
            return await self._connect()

    async def _connect(self) -> ConnectAttempt:
        s = self.settings
        try:
            context = self.context()
        except CertificateError as exc:
            return self._record(
                ConnectAttempt(
                    s.device_id, ConnectOutcome.CREDENTIALS_ERROR, exc.code, message=exc.reason
                )
            )
        try:
            tls = await open_device_tls(
                s.host,
                s.port,
                context,
                server_name=s.server_name,
                timeout=s.connect_timeout,
                source_ip=s.source_ip,
                on_connected=self._set_local_address,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            failure = classify_tls_failure(exc)
            return self._record(
                ConnectAttempt(
                    s.device_id, failure.outcome, failure.reason, message=failure.message
                )
            )
        if s.pins:
            presented = spki_pin(tls.tls.peer_certificate_der())
            if presented not in s.pins:
                tls.tls.close()
                return self._record(
                    ConnectAttempt(
                        s.device_id,
                        ConnectOutcome.BROKER_UNTRUSTED,
                        UntrustedReason.PIN_MISMATCH,
                        tls.tcp_seconds,
                        tls.tls_seconds,
                        message=f"the broker's key {presented} is not pinned",
                    )
                )
        self._tls_error = None
        self._disconnected.clear()
        self._connack = self._loop.create_future()
        tls.tls.on_error = self._note_tls_error
        self._client.prepared = tls.tls
        started = time.perf_counter()
        self._client.reconnect()
        connack = self._connack
        try:
            result, detail = await asyncio.wait_for(connack, s.connect_timeout)
        except TimeoutError:
            self._client.disconnect()
            return self._record(
                ConnectAttempt(
                    s.device_id,
                    ConnectOutcome.TIMEOUT,
                    NO_CONNACK,
                    tls.tcp_seconds,
                    tls.tls_seconds,
                )
            )
        mqtt_seconds = time.perf_counter() - started
        if result == "ok":
            if self.connected:  # not already cut (e.g. taken over right after its CONNACK)
                if s.subscribe_commands:
                    self._client.subscribe(f"devices/{s.device_id}/commands", qos=1)
                for topic_filter in s.also_subscribe:
                    self._client.subscribe(topic_filter, qos=1)
            outcome: ConnectOutcome = ConnectOutcome.CONNECTED
        elif result == "refused":
            outcome = ConnectOutcome.CONNACK_REFUSED
        elif detail == CLOSED_BY_BROKER and tls.certificate_accepted:
            # closed on our CONNECT after the broker had accepted the certificate
            outcome, detail = ConnectOutcome.CONNACK_REFUSED, CLOSED_AT_CONNECT
        else:
            outcome = ConnectOutcome.REJECTED_BY_BROKER
        return self._record(
            ConnectAttempt(
                s.device_id,
                outcome,
                detail,
                tls.tcp_seconds,
                tls.tls_seconds,
                mqtt_seconds,
                group=tls.group,
                broker_signature=tls.broker_signature,
                handshake_bytes=tls.handshake_bytes,
            )
        )

    def _set_local_address(self, address: str) -> None:
        self._local_address = address

    def _record(self, attempt: ConnectAttempt) -> ConnectAttempt:
        if self._local_address is not None:
            attempt = dataclasses.replace(attempt, local_address=self._local_address)
            self._local_address = None
        self.stats.attempts.append(attempt)
        if self._on_attempt is not None:
            self._on_attempt(attempt)
        return attempt

    async def wait_disconnected(self) -> None:
        await self._disconnected.wait()

    def publish_telemetry(self) -> None:
        s = self.settings
        self._seq += 1
        body = {"seq": self._seq, "ts": time.time(), "temperature": round(random.gauss(21, 2), 2)}
        payload = json.dumps(body).encode()
        payload += b" " * max(0, s.payload_size - len(payload))
        self.publish(f"devices/{s.device_id}/telemetry", payload, qos=s.qos)

    def publish(self, topic: str, payload: bytes, *, qos: int) -> None:
        """Publish on any topic (the broker decides whether this device may)."""
        info = self._client.publish(topic, payload, qos=qos)
        if qos > 0:
            self._inflight[info.mid] = time.monotonic()
            self._all_acknowledged.clear()
        self.stats.sent += 1

    def unacknowledged(self, *, older_than: float = 0.0) -> int:
        """QoS 1 publications still waiting for their PUBACK after ``older_than`` seconds."""
        cutoff = time.monotonic() - older_than
        return sum(1 for sent in self._inflight.values() if sent <= cutoff)

    async def subscribe(self, topic_filter: str, *, qos: int = 1, timeout: float = 5.0) -> bool:
        """Subscribe; True when the broker granted it, False when its SUBACK refused it."""
        if not self.connected:
            raise ConnectionError(f"{self.device_id} is not connected")
        waiter: asyncio.Future[bool] = self._loop.create_future()
        result, mid = self._client.subscribe(topic_filter, qos=qos)
        if mid is None:
            raise ConnectionError(
                f"{self.device_id}: subscribe failed ({mqtt.error_string(result)})"
            )
        self._subscriptions[mid] = waiter
        return await asyncio.wait_for(waiter, timeout)

    # -- requests to the control plane (see fleet.kernel.mqtt_api) ---------------------------------

    async def request(self, kind: str, subject: str, request_id: str, payload: bytes) -> Reply:
        """Publish a request and wait for the control plane's reply (QoS 1 both ways).

        Raises ``TimeoutError`` when no reply comes within ``request_timeout`` and
        ``ConnectionError`` when not connected or the broker refuses the reply subscription.
        """
        answer = reply_topic(kind, subject)
        if answer not in self._reply_topics:
            if not await self.subscribe(answer, timeout=self.settings.request_timeout):
                raise ConnectionError(f"the broker refused the subscription to {answer}")
            self._reply_topics.add(answer)
        waiter: asyncio.Future[Reply] = self._loop.create_future()
        self._replies[request_id] = waiter
        try:
            info = self._client.publish(request_topic(kind, subject), payload, qos=1)
            self._request_mids.add(info.mid)
            return await asyncio.wait_for(waiter, self.settings.request_timeout)
        finally:
            self._replies.pop(request_id, None)

    async def renew(self) -> Reply:
        """Renew over MQTT: a new key and CSR, proven with the current certificate.

        On success the new pair replaces ``cert``/``key`` on disk and is used for the next
        handshake; the live session is kept (see :meth:`reconnect_gracefully`).
        """
        s = self.settings
        prepared = await asyncio.to_thread(prepare_renewal, s.device_id, s.cert, s.key)
        reply = await self.request(RENEW, s.device_id, prepared.request_id, prepared.payload)
        if reply.issued:
            await asyncio.to_thread(
                install_identity, s.cert, s.key, reply.certificate.encode(), prepared.key_pem
            )
            self.swap_certificate(s.cert, s.key)
            self.stats.renewals += 1
        return reply

    def _renewal_due_in(self, fraction: float) -> float:
        """Seconds until this device should renew: at ``fraction`` of its certificate's life,
        10% earlier at most, at random, so a fleet provisioned at once does not renew at once."""
        cert = x509.load_pem_x509_certificate(self.settings.cert.read_bytes())
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        due = start + (end - start) * fraction * random.uniform(0.9, 1.0)
        return (due - dt.datetime.now(dt.UTC)).total_seconds()

    async def _keep_renewed(self, stop: asyncio.Event, fraction: float) -> None:
        """Renew at ``fraction`` of each certificate's lifetime, then move the live session to
        the new certificate. Failures are counted by reason and retried with backoff."""
        failures = 0
        while not stop.is_set():
            if failures == 0:
                delay = self._renewal_due_in(fraction)
            else:
                cap = min(self.settings.backoff_cap, self.settings.backoff_base * 2**failures)
                delay = random.uniform(cap / 2, cap)
            if await _stopped_within(stop, max(0.0, delay)):
                return
            while not self.connected or self._leaving:
                if await _stopped_within(stop, 0.2):
                    return
            try:
                reply = await self.renew()
            except TimeoutError:
                reason = "timeout"
            except ConnectionError:
                reason = "disconnected"
            except CertificateError:
                reason = "credentials_error"
            else:
                if reply.issued:
                    failures = 0
                    await self.reconnect_gracefully()
                    continue
                reason = reply.reason
            self.stats.renewal_failures[reason] += 1
            failures += 1

    async def reconnect_gracefully(self, *, ack_grace: float = 3.0) -> None:
        """Drain QoS 1 acks and disconnect cleanly; :meth:`run` connects again at once.

        Used after :meth:`swap_certificate` to move a live session to the renewed certificate
        without losing a message.
        """
        if not self.connected or self._leaving:
            return
        self._leaving = True  # no new publications from here on
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_acknowledged.wait(), ack_grace)
        self.stats.planned_reconnects += 1
        self._client.disconnect()

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected and publishing until ``stop``; back off with full jitter between tries.

        With ``renew_at`` set, the certificate is renewed over MQTT as it ages.
        """
        renewing = (
            asyncio.ensure_future(self._keep_renewed(stop, self.settings.renew_at))
            if self.settings.renew_at
            else None
        )
        try:
            await self._stay_connected(stop)
        finally:
            if renewing is not None:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing

    async def _stay_connected(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            attempt = await self.connect()
            if attempt.outcome is ConnectOutcome.CONNECTED:
                failures = 0
                await self._publish_until_disconnected(stop)
                if self.settings.reconnect or self._planned_drop:
                    continue
                break
            if attempt.outcome is ConnectOutcome.CREDENTIALS_ERROR or not self.settings.reconnect:
                break  # retrying cannot mend a missing or mismatched key
            failures += 1
            cap = min(self.settings.backoff_cap, self.settings.backoff_base * 2**failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), random.uniform(0, cap))
        await self.close()

    async def _publish_until_disconnected(self, stop: asyncio.Event) -> None:
        interval = self.settings.publish_every
        wait = random.uniform(
            0, interval
        )  # the first one at random: spreads a fleet's publications
        while self.connected and not stop.is_set():
            waiters = {
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._disconnected.wait()),
            }
            _, pending = await asyncio.wait(
                waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
            if not self.connected or stop.is_set():
                break
            if not self._leaving:
                self.publish_telemetry()
            wait = interval

    async def close(self, *, ack_grace: float = 3.0) -> None:
        """Wait (up to ``ack_grace`` s) for outstanding QoS 1 acknowledgements, then disconnect."""
        if self.connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_acknowledged.wait(), ack_grace)
            self._leaving = True
            self._client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), 5)
        self.connected = False


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds``; True when ``stop`` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()

"""One client connection: TLS over memory BIOs, the CONNECT guard, and the packets of an
admitted session handed to the MQTT engine (:mod:`broker.engine`).

We accept TCP ourselves and run the handshake here, so every attempt is timed, classified and
counted before any MQTT byte is read. What the engine sends is gathered per loop iteration
and leaves as one TLS write (one record up to 16 KiB) and one socket write.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sys
import time
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509
from OpenSSL import SSL

from broker.acl import NO_RIGHTS, TopicRights
from broker.outcomes import (
    BrokerEvent,
    Outcome,
    SessionEnd,
    classify_tls_error,
    openssl_reason,
    refine_verify_failure,
)
from broker.packets import (
    CONNECT,
    DISCONNECT,
    ConnackCode,
    ConnectRequest,
    Packet,
    PacketFramer,
    ProtocolViolation,
    UnsupportedProtocol,
    connack,
    header_problem,
    parse_connect,
)
from broker.sessions import Session
from fleet.kernel.errors import CertificateError
from fleet.kernel.identity import DEVICE, DeviceIdentity, identity_from_certificate, valid_until
from fleet.kernel.lifecycle import Disconnect, is_event_topic
from fleet.store.crls import authority_key_id

if TYPE_CHECKING:
    from broker.server import FleetBroker

_READ_SIZE = 65536
# Keep alive: a client silent for this many times its keep alive is disconnected [MQTT-3.1.2-24].
_KEEP_ALIVE_GRACE = 1.5
_RECORD_SIZE = 16384  # the largest TLS record's plaintext
# A connection is read at most this much per event-loop iteration; then it waits its turn
# (the event loop would otherwise read a flooding socket up to 32 times in a row, and a
# handshake waiting behind 20 flooders took 4 s).
_TURN_BYTES = 64 * 1024
_REMEMBERED_TOPICS = 64  # publish verdicts kept per connection (devices reuse a few topics)
# After a refused handshake the alert is sent, then FIN, and the client's bytes are drained
# this long: closing with unread bytes (a TLS 1.3 client already sent CONNECT) makes the
# kernel send a reset, which can destroy the alert before the client reads it.
_LINGER_SECONDS = 1.0


class PeerConnection(asyncio.Protocol):
    """A device's connection, from TCP accept to close.

    It is also the engine's :class:`broker.sessions.Link`: rights, output and accounting of
    the connection in hand, whoever created the session it serves.
    """

    __slots__ = (
        "_framer",
        "_last_packet_at",
        "_leaving",
        "_loop",
        "_output",
        "_paused",
        "_publish_verdicts",
        "_read_this_turn",
        "_serial",
        "_timers",
        "_valid_until",
        "_waiting_turn",
        "_window_timer",
        "accepted_at",
        "authorized",
        "broker",
        "client_id",
        "closed",
        "connect_request",
        "connected_at",
        "device_signature",
        "ended_by",
        "group",
        "handshaken",
        "identity",
        "issuer",
        "issuer_key_id",
        "issuer_revoked",
        "leaf",
        "mqtt_session",
        "outcome",
        "peer_address",
        "peername",
        "policy_problem",
        "refused",
        "rights",
        "tls",
        "transport",
        "verify_code",
    )

    def __init__(self, broker: FleetBroker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.tls: SSL.Connection | None = None
        self.peer_address = "?"
        self.peername: tuple[str, int] | None = None
        self.accepted_at = 0.0
        self.handshaken = False
        self.refused = False  # the handshake failed: the alert is out, we only drain and close
        self.closed = False
        self.outcome: Outcome | None = None
        self.leaf: Any = None  # the client's leaf as the verify callback saw it (OpenSSL X509)
        self.verify_code: int | None = None
        self.group: str | None = None  # the key exchange's group, once the handshake ended
        self.device_signature: str | None = None  # the scheme the client signed with
        self.issuer_revoked = False  # the chain's issuing CA is on the root's CRL
        self.issuer: x509.Name | None = None  # of the accepted certificate (shared object)
        self.issuer_key_id: bytes | None = None  # its Authority Key Identifier
        self._serial: int | None = None
        self._valid_until: dt.datetime | None = None
        self.identity: DeviceIdentity | None = None
        self.rights: TopicRights | None = None
        self.client_id: str | None = None  # the MQTT client id, once CONNECT was admitted
        self.connect_request: ConnectRequest | None = None  # the admitted CONNECT
        self.authorized = False
        self.connected_at = 0.0  # monotonic, when the CONNECT was admitted
        self.ended_by: str | None = None  # why the session ended (a lifecycle Disconnect reason)
        self.mqtt_session: Session | None = None  # the engine's session, while it serves this
        self._framer = PacketFramer(broker.settings.max_connect_bytes)
        self._timers: list[asyncio.TimerHandle] = []
        self._paused = False
        self._last_packet_at = 0.0
        self._leaving = False  # a DISCONNECT or the end of the stream was seen
        self._output: list[bytes] = []  # plaintext packets for the next TLS write
        self._read_this_turn = 0
        self._waiting_turn = False
        self._loop = asyncio.get_running_loop()
        self._publish_verdicts: dict[str, bool] = {}  # topic -> may publish (see change_rights)
        # why the policy's requirements refuse this certificate (decided at CONNECT)
        self.policy_problem: str | None = None
        self._window_timer: asyncio.TimerHandle | None = None

    # -- identity, for plugins and logs ----------------------------------------------------

    @property
    def device_id(self) -> str | None:
        if self.identity is not None:
            return self.identity.device_id
        return _common_name(self._presented_certificate())

    @property
    def serial(self) -> int | None:
        if self._serial is not None:
            return self._serial
        cert = self._presented_certificate()
        return cert.serial_number if cert is not None else None

    @property
    def issuer_name(self) -> str | None:
        """The issuing CA's name (RFC 4514) of the certificate accepted, or of the one presented."""
        if self.issuer is not None:
            return self.issuer.rfc4514_string()
        cert = self._presented_certificate()
        return cert.issuer.rfc4514_string() if cert is not None else None

    def _presented_certificate(self) -> x509.Certificate | None:
        """The certificate of a handshake that failed (the verify callback's leaf)."""
        if self.leaf is not None:
            return cast(x509.Certificate, self.leaf.to_cryptography())
        return None

    # -- asyncio protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peername = (peer[0], peer[1])
            self.peer_address = f"{peer[0]}:{peer[1]}"
        self.accepted_at = time.perf_counter()
        self.tls = SSL.Connection(self.broker.tls_context, None)
        self.tls.set_app_data(self)
        self.tls.set_accept_state()
        self.broker.handshake_tracer.track(self.tls)
        loop = asyncio.get_running_loop()
        self._timers.append(
            loop.call_later(self.broker.settings.handshake_timeout, self._handshake_timed_out)
        )
        self.broker.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        assert self.tls is not None and self.transport is not None
        if self.refused:
            return
        self._read_this_turn += len(data)
        if self._read_this_turn >= _TURN_BYTES and not self._waiting_turn:
            self._waiting_turn = True
            self.transport.pause_reading()
            self._loop.call_soon(self._next_turn)
        self.tls.bio_write(data)
        if not self.handshaken:
            self._continue_handshake()
        if self.handshaken and not self.closed:
            self._read_plaintext()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.handshaken and self.tls is not None:
            self.broker.handshake_tracer.finish(self.tls)
        for timer in self._timers:
            timer.cancel()
        self._end_session(graceful=False)
        if self.outcome is None:
            stage = "the TLS handshake completed" if not self.handshaken else "MQTT CONNECT"
            self.broker.record(self, Outcome.PROTOCOL_ERROR, f"connection closed before {stage}")
        self.broker.connection_closed(self)

    def _next_turn(self) -> None:
        self._read_this_turn = 0
        self._waiting_turn = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.broker.engine.writable(self)

    # -- TLS --------------------------------------------------------------------------------

    def _continue_handshake(self) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as exc:
            self._note_negotiated()
            self._handshake_failed(classify_tls_error(exc, self.verify_code), exc)
            return
        self._note_negotiated()
        if self.verify_code is not None:  # never admit a chain the verify callback saw fail
            failure = SSL.Error([("", "", "certificate verify failed")])
            self._handshake_failed(classify_tls_error(failure, self.verify_code), failure)
            return
        self._flush()
        self.handshaken = True
        self._timers[0].cancel()
        self.broker.metrics.handshakes_negotiated.labels(
            self.group or "none", self.device_signature or "none"
        ).inc()
        self.broker.handshake_seconds(time.perf_counter() - self.accepted_at, ok=True)
        try:
            certificate = self.tls.get_peer_certificate(as_cryptography=True)
            assert certificate is not None
            self.identity = identity_from_certificate(certificate)
        except CertificateError as exc:
            self.broker.record(self, Outcome.IDENTITY_MISMATCH, exc.reason)
            self.close()
            return
        # What the session needs of its certificate for its whole life, and nothing more (the
        # parsed certificate would cost ~7 KB per connection).
        self._serial = certificate.serial_number
        self.issuer = self.broker.shared_issuer(certificate.issuer)
        self.issuer_key_id = authority_key_id(certificate)
        self._valid_until = valid_until(certificate)
        self.leaf = None
        self.rights = (  # a claim's or the admin's rights are set at CONNECT
            self.broker.policy.rights(self.identity) if self.identity.role == DEVICE else NO_RIGHTS
        )
        requirements = self.broker.policy.requirements
        if self.identity.role == DEVICE and requirements.any:  # here: the certificate is not kept
            self.policy_problem = requirements.problem(certificate)
        if self._seconds_left() <= 0:  # expired while OpenSSL's check gave way to this one
            self.broker.record(self, Outcome.EXPIRED, "certificate expired during the handshake")
            self.close()
            return
        if not self.broker.handshake_accepted(self):
            return
        self._schedule_expiry()
        loop = asyncio.get_running_loop()
        self._timers.append(
            loop.call_later(self.broker.settings.handshake_timeout, self._connect_timed_out)
        )

    def _note_negotiated(self) -> None:
        """What the handshake agreed on: the group, and the scheme the client signed with."""
        assert self.tls is not None
        facts = self.broker.handshake_tracer.finish(self.tls)
        group = self.tls.get_group_name()
        self.group = sys.intern(group) if group else None
        signature = facts.peer_signature if facts is not None else None
        self.device_signature = sys.intern(signature) if signature else None

    def _handshake_failed(self, outcome: Outcome, exc: SSL.Error) -> None:
        self.broker.handshake_seconds(time.perf_counter() - self.accepted_at, ok=False)
        detail = openssl_reason(exc)
        if self.verify_code is not None:
            outcome, detail = refine_verify_failure(self.verify_code, detail)
        if self.issuer_revoked:
            outcome, detail = Outcome.ISSUER_REVOKED, "its issuing CA is revoked (root CRL)"
        self.broker.record(self, outcome, detail)
        self._flush()  # the alert tells the client why: sent once the refusal is on record
        self._linger_and_close()

    def _linger_and_close(self) -> None:
        """Send the queued alert, then FIN; drop what the client still sends; close soon."""
        self.refused = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(_LINGER_SECONDS, self.transport.close))

    def _handshake_timed_out(self) -> None:
        if self.handshaken or self.closed or self.refused:
            return
        self.broker.handshake_seconds(time.perf_counter() - self.accepted_at, ok=False)
        timeout = self.broker.settings.handshake_timeout
        self.broker.record(
            self, Outcome.HANDSHAKE_TIMEOUT, f"no TLS handshake within {timeout:g} s"
        )
        self.abort()

    def _seconds_left(self) -> float:
        assert self._valid_until is not None
        return (self._valid_until - dt.datetime.now(dt.UTC)).total_seconds()

    def _schedule_expiry(self) -> None:
        """A session never outlives its certificate: close it when notAfter's second ends."""
        loop = asyncio.get_running_loop()
        self._timers.append(
            loop.call_later(self._seconds_left(), self.close_by_broker, SessionEnd.EXPIRED)
        )

    def _flush(self) -> None:
        assert self.tls is not None and self.transport is not None
        chunks = []
        while True:
            try:
                chunk = self.tls.bio_read(_READ_SIZE)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _READ_SIZE:
                break  # drained: no need for the exception that says so (it is costly)
        if chunks and not self.transport.is_closing():
            self.transport.write(b"".join(chunks))

    def _read_plaintext(self) -> None:
        assert self.tls is not None
        while not self.closed and not self.refused:
            try:
                data = self.tls.recv(_READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # close_notify
                self.close()
                return
            except SSL.Error as exc:
                self.broker.log_event(BrokerEvent.TLS_ERROR, self, detail=openssl_reason(exc))
                self.abort()
                return
            self._on_plaintext(data)
        self._flush()  # TLS 1.3 may answer (key updates, tickets)

    # -- MQTT packets -----------------------------------------------------------------------

    def _on_plaintext(self, data: bytes) -> None:
        """Frame and check the client's packets; hand the good ones to the engine.

        The first packet must be a CONNECT the broker admits (see :meth:`_on_connect`); any
        malformed or protocol-violating packet closes the connection, counted and logged with
        what was wrong. Nothing after a DISCONNECT is read.
        """
        if self._leaving:
            return
        if self.connect_request is None and not self._framer.buffered and data[0] >> 4 != CONNECT:
            self._violation(f"first MQTT packet is type {data[0] >> 4}, not CONNECT")
            return
        try:
            packets = self._framer.feed(data)
        except ProtocolViolation as exc:
            self._violation(str(exc))
            return
        if packets:
            self._last_packet_at = time.monotonic()
        handle = self.broker.engine.handle
        for packet in packets:
            if self.connect_request is None:
                if not self._on_connect(packet):
                    return
                continue
            if (problem := header_problem(packet)) is not None:
                self._violation(problem)
                return
            if packet.kind == DISCONNECT:
                self._leave()
                return
            try:
                handle(self, packet)
            except ProtocolViolation as exc:
                self._violation(str(exc))
                return

    def _on_connect(self, packet: Packet) -> bool:
        """The first packet: read the whole CONNECT and let the broker decide, before the engine
        creates, resumes or deletes any session. False when the connection was refused."""
        if packet.kind != CONNECT:
            return self._refuse_connect(f"first MQTT packet is type {packet.kind}, not CONNECT")
        try:
            request = parse_connect(packet.body)
        except UnsupportedProtocol as exc:
            return self._refuse_connect(str(exc), ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION)
        except ProtocolViolation as exc:
            return self._refuse_connect(str(exc))
        code = self.broker.admit_connect(self, request)
        if code is not ConnackCode.ACCEPTED:
            self.send(connack(code))
            self._shut_after_refusal()
            return False
        self.connect_request = request
        self._framer.max_bytes = self.broker.settings.max_packet_bytes
        self._arm_keep_alive(request.keep_alive)
        self.broker.engine.connect(self, request)
        return True

    def _refuse_connect(self, detail: str, code: ConnackCode | None = None) -> bool:
        self.broker.record(self, Outcome.PROTOCOL_ERROR, detail)
        if code is not None:
            self.send(connack(code))
        self._shut_after_refusal()
        return False

    def _shut_after_refusal(self) -> None:
        """close_notify, then FIN; what the client still sends is dropped, and we close soon
        (closing with unread bytes would reset the connection before it reads the CONNACK)."""
        assert self.tls is not None
        with contextlib.suppress(SSL.Error):
            self.tls.shutdown()
        self._flush()
        self._linger_and_close()

    def _violation(self, detail: str) -> None:
        """A malformed or protocol-violating packet: the connection ends at once."""
        if self.connect_request is None:
            self._refuse_connect(detail)
        else:
            self.close_by_broker(SessionEnd.PROTOCOL_ERROR, detail)
        self.refused = True  # read nothing more

    def _connect_timed_out(self) -> None:
        if self.connect_request is not None or self.closed or self.outcome is not None:
            return
        timeout = self.broker.settings.handshake_timeout
        self.broker.record(self, Outcome.HANDSHAKE_TIMEOUT, f"no MQTT CONNECT within {timeout:g} s")
        self.close()

    def _arm_keep_alive(self, keep_alive: int) -> None:
        """Disconnect a client silent for 1.5 times its keep alive (0: never) [MQTT-3.1.2-24];
        its will is published."""
        if keep_alive <= 0:
            return
        limit = keep_alive * _KEEP_ALIVE_GRACE
        loop = asyncio.get_running_loop()

        def check() -> None:
            if self.closed:
                return
            silent = time.monotonic() - self._last_packet_at
            if silent < limit:
                self._timers.append(loop.call_later(limit - silent, check))
                return
            self.close_by_broker(
                SessionEnd.KEEPALIVE_TIMEOUT,
                f"nothing received for {silent:.1f} s (keep alive {keep_alive} s)",
            )

        self._timers.append(loop.call_later(limit, check))

    def _leave(self) -> None:
        """A DISCONNECT: the session lets go without its will, and the connection closes."""
        self._leaving = True
        self.ended_by = self.ended_by or Disconnect.CLIENT
        self._end_session(graceful=True)
        self.close()

    def _end_session(self, *, graceful: bool) -> None:
        self._leaving = True
        if self.mqtt_session is not None:
            self.broker.engine.disconnected(self, graceful=graceful)

    # -- the engine's link ------------------------------------------------------------------

    @property
    def writing_paused(self) -> bool:
        return self._paused or self.closed

    def write(self, data: bytes) -> None:
        """Queue a packet; everything queued in this loop iteration leaves in one TLS write."""
        if not self._output:
            self._loop.call_soon(self._write_output)
        self._output.append(data)

    def close_when_window_ends(self, seconds: float | None, detail: str) -> None:
        """Close the session (``window_closed``) ``seconds`` from now; None: never (again)."""
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None
        if seconds is not None:
            self._window_timer = asyncio.get_running_loop().call_later(
                max(0.0, seconds), self.close_by_broker, SessionEnd.WINDOW_CLOSED, detail
            )
            self._timers.append(self._window_timer)  # cancelled with the others when it ends

    def change_rights(self, rights: TopicRights) -> None:
        """New rights for the live session (a new policy): later publishes are judged by them."""
        self.rights = rights
        self._publish_verdicts.clear()

    def may_publish(self, topic: str) -> bool:
        if is_event_topic(topic):
            return False  # only the broker publishes lifecycle events, whatever the rights
        verdict = self._publish_verdicts.get(topic)
        if verdict is None:
            verdict = self.rights is not None and self.rights.may_publish(topic)
            if len(self._publish_verdicts) < _REMEMBERED_TOPICS:
                self._publish_verdicts[topic] = verdict
        return verdict

    def denied(self, action: str, topic: str) -> None:
        self.broker.acl_denied(self, action, topic)

    def _write_output(self) -> None:
        if self._output:
            data = b"".join(self._output)
            self._output.clear()
            self.send(data)

    def send(self, data: bytes) -> None:
        """Encrypt and send application bytes."""
        if self.closed or self.tls is None:
            return
        if len(data) <= _RECORD_SIZE:
            self.tls.send(data)
        else:
            view = memoryview(data)
            while view:
                sent = self.tls.send(view[:_RECORD_SIZE].tobytes())
                view = view[sent:]
        self._flush()

    def close(self) -> None:
        """Send what is queued, close_notify, and close the socket; the session is released
        at once (its will is published unless the client said DISCONNECT)."""
        if self.transport is None or self.transport.is_closing():
            return
        self._end_session(graceful=False)
        self._write_output()
        if self.tls is not None and self.handshaken:
            # A peer that already went away cannot take a close_notify: close anyway.
            with contextlib.suppress(SSL.Error):
                self.tls.shutdown()
            self._flush()
        self.transport.close()

    def abort(self) -> None:
        self._end_session(graceful=False)
        if self.transport is not None:
            self.transport.abort()

    def close_by_broker(self, reason: SessionEnd, detail: str | None = None) -> None:
        """End a live session (revoked, expired, takeover, keep alive, protocol error), counted
        and logged."""
        if self.closed or (self.transport is not None and self.transport.is_closing()):
            return
        self.ended_by = self.ended_by or reason
        self.broker.session_ended_by_broker(self, reason, detail)
        self.close()


def _common_name(cert: x509.Certificate | None) -> str | None:
    if cert is None:
        return None
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None

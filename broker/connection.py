"""One client connection: TLS over memory BIOs, the CONNECT guard, and amqtt's stream adapters.

We accept TCP ourselves and run the handshake here (amqtt's own listener hides failed
handshakes and only asks for an optional certificate), so every attempt is timed, classified
and counted before an accepted stream is handed to amqtt.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import time
from typing import TYPE_CHECKING, Any, cast

from amqtt.adapters import ReaderAdapter, WriterAdapter
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from broker.acl import NO_RIGHTS, TopicRights, rights_for
from broker.outcomes import Outcome, classify_tls_error, openssl_reason, refine_verify_failure
from fleet.errors import CertificateError
from fleet.identity import DEVICE, DeviceIdentity, identity_from_certificate

if TYPE_CHECKING:
    import ssl

    from broker.server import FleetBroker

_CONNECT = 0x10
_DISCONNECT = b"\xe0\x00"
_READ_SIZE = 65536
# After a refused handshake the alert is sent, then FIN, and the client's bytes are drained
# this long: closing with unread bytes (a TLS 1.3 client already sent CONNECT) makes the
# kernel send a reset, which can destroy the alert before the client reads it.
_LINGER_SECONDS = 1.0


class _ProtocolViolation(Exception):
    """The first MQTT packet is not an acceptable CONNECT."""


class PeerConnection(asyncio.Protocol):
    """A device's connection, from TCP accept to close.

    It is also what amqtt sees as the session's ``ssl_object``: the broker's plugins read the
    verified identity from it, and ``getpeercert`` keeps amqtt's own cert plugin working.
    """

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
        self.certificate: x509.Certificate | None = None
        self.identity: DeviceIdentity | None = None
        self.rights: TopicRights | None = None
        self.client_id: str | None = None  # the MQTT client id, once CONNECT was admitted
        self.authorized = False
        self.reader = asyncio.StreamReader(limit=_READ_SIZE)
        self._timers: list[asyncio.TimerHandle] = []
        self._serve_task: asyncio.Task[None] | None = None
        self._paused = False
        self._leaving = False  # a goodbye was seen: the rest goes through the teardown queue
        self._ended = False  # the end of the stream was queued
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- identity, for plugins and logs ----------------------------------------------------

    @property
    def device_id(self) -> str | None:
        if self.identity is not None:
            return self.identity.device_id
        return _common_name(self._presented_certificate())

    @property
    def serial(self) -> int | None:
        cert = self._presented_certificate()
        return cert.serial_number if cert is not None else None

    def _presented_certificate(self) -> x509.Certificate | None:
        if self.certificate is not None:
            return self.certificate
        if self.leaf is not None:
            return cast(x509.Certificate, self.leaf.to_cryptography())
        return None

    def getpeercert(self, binary_form: bool = False) -> Any:
        """What ``ssl.SSLObject.getpeercert`` returns, for amqtt's certificate plugin."""
        if self.certificate is None:
            return None
        if binary_form:
            return self.certificate.public_bytes(Encoding.DER)
        return {}

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
        loop = asyncio.get_running_loop()
        self._timers.append(
            loop.call_later(self.broker.settings.handshake_timeout, self._handshake_timed_out)
        )
        self.broker.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        assert self.tls is not None
        if self.refused:
            return
        self.tls.bio_write(data)
        if not self.handshaken:
            self._continue_handshake()
        if self.handshaken and not self.closed:
            self._read_plaintext()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in self._timers:
            timer.cancel()
        self._deliver(None)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if not self.handshaken and self.outcome is None:
            self.broker.record(
                self, Outcome.PROTOCOL_ERROR, "connection closed before the TLS handshake completed"
            )
        self.broker.connection_closed(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- TLS --------------------------------------------------------------------------------

    def _continue_handshake(self) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as exc:
            self._flush()  # the alert tells the client why
            self._handshake_failed(classify_tls_error(exc, self.verify_code), exc)
            return
        self._flush()
        if self.verify_code is not None:  # never admit a chain the verify callback saw fail
            failure = SSL.Error([("", "", "certificate verify failed")])
            self._handshake_failed(classify_tls_error(failure, self.verify_code), failure)
            return
        self.handshaken = True
        self._timers[0].cancel()
        self.broker.handshake_seconds(time.perf_counter() - self.accepted_at, ok=True)
        try:
            self.certificate = self.tls.get_peer_certificate(as_cryptography=True)
            assert self.certificate is not None
            self.identity = identity_from_certificate(self.certificate)
        except CertificateError as exc:
            self.broker.record(self, Outcome.IDENTITY_MISMATCH, exc.reason)
            self.close()
            return
        self.rights = (  # a claim's or the admin's rights are set at CONNECT
            rights_for(self.identity.device_id, self.identity.tier)
            if self.identity.role == DEVICE
            else NO_RIGHTS
        )
        if self._seconds_left() <= 0:  # OpenSSL compares whole seconds; we do not
            self.broker.record(self, Outcome.EXPIRED, "certificate expired during the handshake")
            self.close()
            return
        if not self.broker.handshake_accepted(self):
            return
        self._schedule_expiry()
        self._serve_task = asyncio.get_running_loop().create_task(self._serve())

    def _handshake_failed(self, outcome: Outcome, exc: SSL.Error) -> None:
        self.broker.handshake_seconds(time.perf_counter() - self.accepted_at, ok=False)
        detail = openssl_reason(exc)
        if self.verify_code is not None:
            outcome, detail = refine_verify_failure(self.verify_code, detail)
        self.broker.record(self, outcome, detail)
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
        assert self.certificate is not None
        return (self.certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()

    def _schedule_expiry(self) -> None:
        """A session never outlives its certificate: close it at notAfter."""
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self._seconds_left(), self.close_by_broker, "expired"))

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
        while True:
            try:
                data = self.tls.recv(_READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # close_notify
                self._deliver(None)
                break
            except SSL.Error as exc:
                self.broker.log_event("tls_error", self, detail=openssl_reason(exc))
                self.abort()
                return
            self._deliver(data)
        self._flush()  # TLS 1.3 may answer (key updates, tickets)

    def _deliver(self, data: bytes | None) -> None:
        """Hand plaintext (None: the end of the stream) to amqtt.

        A goodbye (a DISCONNECT packet, or the end of the stream) and whatever follows it go
        through the broker's teardown pacer: tearing a session down is the costliest thing
        amqtt does, and when thousands leave at once, doing it all in one loop iteration would
        stall every other client for a second. Everything else is delivered at once.
        """
        if self._ended:
            return  # nothing follows the end of the stream
        if self._leaving or data is None or data == _DISCONNECT:
            self._leaving = True
            self._ended = data is None
            reader = self.reader
            self.broker.teardowns.add(
                reader.feed_eof if data is None else functools.partial(reader.feed_data, data)
            )
        else:
            self.reader.feed_data(data)

    def send(self, data: bytes) -> None:
        """Encrypt and send application bytes."""
        if self.closed or self.tls is None:
            return
        view = memoryview(data)
        while view:
            sent = self.tls.send(view[:16384].tobytes())
            view = view[sent:]
        self._flush()

    async def drain(self) -> None:
        if self._paused and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def close(self) -> None:
        """Send close_notify and close the socket (what is queued is still sent)."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.tls is not None and self.handshaken:
            # A peer that already went away cannot take a close_notify: close anyway.
            with contextlib.suppress(SSL.Error):
                self.tls.shutdown()
            self._flush()
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close_by_broker(self, reason: str) -> None:
        """End a live session (revoked, expired, takeover), counted and logged."""
        if self.closed or (self.transport is not None and self.transport.is_closing()):
            return
        self.broker.session_ended_by_broker(self, reason)
        self.close()

    # -- MQTT -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        settings = self.broker.settings
        try:
            header = await asyncio.wait_for(self._read_connect_header(), settings.handshake_timeout)
        except TimeoutError:
            self.broker.record(
                self,
                Outcome.HANDSHAKE_TIMEOUT,
                f"no MQTT CONNECT within {settings.handshake_timeout:g} s",
            )
            self.close()
            return
        except asyncio.IncompleteReadError:
            self.broker.record(
                self, Outcome.PROTOCOL_ERROR, "connection closed before MQTT CONNECT"
            )
            self.close()
            return
        except _ProtocolViolation as exc:
            self.broker.record(self, Outcome.PROTOCOL_ERROR, str(exc))
            self.close()
            return
        await self.broker.serve_mqtt(self, _ReplayReader(self.reader, header), _TlsWriter(self))
        if self.outcome is None:
            self.broker.record(self, Outcome.PROTOCOL_ERROR, "malformed or refused MQTT CONNECT")
        self.close()

    async def _read_connect_header(self) -> bytes:
        """Read the fixed header of the first packet: it must be a CONNECT of bounded size."""
        header = bytearray(await self.reader.readexactly(1))
        if header[0] & 0xF0 != _CONNECT:
            raise _ProtocolViolation(f"first MQTT packet is type {header[0] >> 4}, not CONNECT")
        length, multiplier = 0, 1
        for _ in range(4):
            byte = (await self.reader.readexactly(1))[0]
            header.append(byte)
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        else:
            raise _ProtocolViolation("malformed remaining length in CONNECT")
        limit = self.broker.settings.max_connect_bytes
        if length > limit:
            raise _ProtocolViolation(f"CONNECT of {length} bytes exceeds the {limit}-byte limit")
        return bytes(header)


def _common_name(cert: x509.Certificate | None) -> str | None:
    if cert is None:
        return None
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class _ReplayReader(ReaderAdapter):
    """amqtt's reader: replays the CONNECT header the guard consumed, then reads the stream."""

    def __init__(self, reader: asyncio.StreamReader, prefix: bytes) -> None:
        self._reader = reader
        self._prefix = prefix

    async def read(self, n: int = -1) -> bytes:
        if self._prefix:
            if n == -1 or n >= len(self._prefix):
                head, self._prefix = self._prefix, b""
                rest = n - len(head) if n != -1 else -1
                if rest == 0:
                    return head
                more = await (
                    self._reader.read(-1) if rest == -1 else self._reader.readexactly(rest)
                )
                return head + more
            head, self._prefix = self._prefix[:n], self._prefix[n:]
            return head
        if n == -1:
            return await self._reader.read(-1)
        return await self._reader.readexactly(n)

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class _TlsWriter(WriterAdapter):
    """amqtt's writer: plaintext in, TLS records out."""

    def __init__(self, peer: PeerConnection) -> None:
        self._peer = peer

    def write(self, data: bytes) -> None:
        self._peer.send(data)

    async def drain(self) -> None:
        await self._peer.drain()

    def get_peer_info(self) -> tuple[str, int] | None:
        return self._peer.peername

    def get_ssl_info(self) -> ssl.SSLObject | None:
        # amqtt stores this as session.ssl_object; our plugins read the identity from it.
        return cast("ssl.SSLObject", self._peer)

    async def close(self) -> None:
        self._peer.close()

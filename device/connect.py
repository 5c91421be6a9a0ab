"""TCP connect and TLS handshake without blocking the event loop.

paho's own ``connect`` performs a blocking handshake, which would serialise thousands of
devices. Here the handshake is driven step by step on a non-blocking socket, so many devices
handshake concurrently on one loop; the finished socket is then handed to paho.

Simulated devices connect with :func:`open_device_tls` (pyOpenSSL, see :mod:`fleet.kernel.tls`);
what it raises, and what its :class:`TlsConnection` raises to paho, is what Python's ``ssl``
raises for the same event (a verify failure is an ``ssl.SSLCertVerificationError`` with
OpenSSL's verify code, an alert an ``ssl.SSLError`` whose ``reason`` names it …), so the
device's outcome classification (:func:`device.outcomes.classify_tls_failure`) is the same
whichever library carried the handshake. :func:`open_tls_socket` (Python ``ssl``) serves the
handshake bench.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from fleet.kernel.handshake_trace import HandshakeFacts
from fleet.kernel.tls import DeviceTls


@dataclass(frozen=True, slots=True)
class TlsSocket:
    sock: ssl.SSLSocket
    tcp_seconds: float
    tls_seconds: float


async def open_tls_socket(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    server_name: str | None = None,
    timeout: float = 10.0,
    source_ip: str | None = None,
    session: ssl.SSLSession | None = None,
    on_connected: Callable[[str], None] | None = None,
) -> TlsSocket:
    """Connect to ``host:port`` and complete the TLS handshake; raises on any failure.

    ``session`` resumes an earlier TLS session (``sock.session`` of a finished connection).
    ``on_connected`` gets our own address ("IP:PORT", as the broker sees us) once TCP is up.
    """
    loop = asyncio.get_running_loop()
    raw = await _new_socket(loop, host, port, source_ip)
    sock: socket.socket = raw
    try:
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            await _tcp_connect(loop, raw, host, port, on_connected)
            connected = time.perf_counter()
            tls = sock = context.wrap_socket(  # takes the descriptor over from ``raw``
                raw,
                server_hostname=server_name or host,
                do_handshake_on_connect=False,
                session=session,
            )
            await _handshake(loop, tls)
    except BaseException:
        sock.close()  # closing ``raw`` after wrap_socket would leave the descriptor open
        raise
    done = time.perf_counter()
    return TlsSocket(tls, connected - started, done - connected)


async def _new_socket(
    loop: asyncio.AbstractEventLoop, host: str, port: int, source_ip: str | None
) -> socket.socket:
    """A non-blocking TCP socket of the family ``host`` resolves to, bound to ``source_ip``."""
    family, _ = await _resolve(loop, host, port)
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.setblocking(False)
    try:
        if source_ip:
            raw.bind((source_ip, 0))
    except BaseException:
        raw.close()
        raise
    return raw


async def _tcp_connect(
    loop: asyncio.AbstractEventLoop,
    raw: socket.socket,
    host: str,
    port: int,
    on_connected: Callable[[str], None] | None,
) -> None:
    """Connect ``raw``; ``on_connected`` gets our own address (as the broker sees us)."""
    _, address = await _resolve(loop, host, port)
    await loop.sock_connect(raw, address)
    if on_connected is not None:
        local = raw.getsockname()
        on_connected(f"{local[0]}:{local[1]}")


_resolved: dict[tuple[str, int], tuple[int, Any]] = {}


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[int, Any]:
    """The address of ``host:port``, looked up once per process (a lookup is a thread hop)."""
    key = (host, port)
    if key not in _resolved:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        _resolved[key] = (family, address)
    return _resolved[key]


async def _handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket) -> None:
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await wait_ready(loop, sock, readable=True)
        except ssl.SSLWantWriteError:
            await wait_ready(loop, sock, readable=False)


async def wait_ready(
    loop: asyncio.AbstractEventLoop, sock: socket.socket | TlsConnection, *, readable: bool
) -> None:
    """Wait until ``sock`` is readable (or writable) without blocking the loop."""
    future: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    fd = sock.fileno()
    if readable:
        loop.add_reader(fd, wake)
    else:
        loop.add_writer(fd, wake)
    try:
        await future
    finally:
        if readable:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)


# -- simulated devices: pyOpenSSL ------------------------------------------------------------


class TlsConnection:
    """A finished pyOpenSSL connection, as paho uses a socket: ``recv``/``send`` raise what an
    ``ssl.SSLSocket`` raises (want-read, want-write, alerts), and the end of the stream reads
    as ``b""``."""

    __slots__ = ("_raw", "connection", "on_error")

    def __init__(self, connection: SSL.Connection, raw: socket.socket) -> None:
        self.connection = connection
        self._raw = raw
        # told of a TLS error that ends the connection (an alert), which paho would hide
        self.on_error: Callable[[ssl.SSLError], None] | None = None

    def recv(self, size: int) -> bytes:
        try:
            return self.connection.recv(size)
        except SSL.ZeroReturnError:  # close_notify
            return b""
        except (SSL.WantReadError, SSL.WantWriteError, SSL.SysCallError, SSL.Error) as exc:
            error = _as_ssl_error(exc, self.connection)
            wants = isinstance(error, ssl.SSLWantReadError | ssl.SSLWantWriteError)
            if self.on_error is not None and isinstance(error, ssl.SSLError) and not wants:
                self.on_error(error)
            raise error from exc

    def send(self, data: bytes) -> int:
        try:
            return self.connection.send(data)
        except (SSL.WantReadError, SSL.WantWriteError, SSL.SysCallError, SSL.Error) as exc:
            raise _as_ssl_error(exc, self.connection) from exc

    def pending(self) -> int:
        return self.connection.pending()

    def setblocking(self, flag: bool) -> None:
        self._raw.setblocking(flag)

    def fileno(self) -> int:
        return self._raw.fileno()

    def peer_certificate_der(self) -> bytes:
        cert = self.connection.get_peer_certificate(as_cryptography=True)
        return cert.public_bytes(Encoding.DER) if cert is not None else b""

    def local_address(self) -> str:
        host, port = self._raw.getsockname()[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        # As ssl.SSLSocket.close: no close_notify. Marked shut down all the same, or OpenSSL
        # takes the connection for a failed one when it is freed and makes its TLS session
        # unresumable (ssl_clear_bad_session): a later --resume would find none to resume.
        self.connection.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        self._raw.close()


@dataclass(frozen=True, slots=True)
class DeviceConnection:
    tls: TlsConnection
    tcp_seconds: float
    tls_seconds: float
    # the broker is known to have accepted our certificate (TLS 1.2's handshake, or TLS 1.3
    # session tickets): an end of the connection after this is an MQTT-level refusal
    certificate_accepted: bool = False
    group: str | None = None  # the key exchange's group, e.g. X25519MLKEM768
    broker_signature: str | None = None  # the scheme the broker signed with, e.g. mldsa65
    handshake_bytes: int = 0  # TLS records both ways until the broker's verdict


async def open_device_tls(
    host: str,
    port: int,
    credentials: DeviceTls,
    *,
    server_name: str | None = None,
    timeout: float = 10.0,
    source_ip: str | None = None,
    on_connected: Callable[[str], None] | None = None,
    session: SSL.Session | None = None,
    no_delay: bool = False,
) -> DeviceConnection:
    """:func:`open_tls_socket` for a simulated device: the same phases, timings and errors
    (``session``: a TLS session of an earlier connection to resume; ``no_delay``: TCP_NODELAY,
    so a CONNECT written right after a resumed TLS 1.2 handshake's Finished is not held back
    by Nagle until the broker's delayed ACK, ~40 ms)."""
    loop = asyncio.get_running_loop()
    raw = await _new_socket(loop, host, port, source_ip)
    if no_delay:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            await _tcp_connect(loop, raw, host, port, on_connected)
            connected = time.perf_counter()
            connection = _client_connection(credentials, raw, server_name or host)
            if session is not None:
                connection.set_session(session)
            facts = credentials.tracer.track(connection) if credentials.tracer else None
            try:
                await _drive_handshake(loop, connection, raw)
                accepted = await _await_verdict(loop, connection, raw)
            except ssl.SSLError as exc:
                failure = _negotiation_failure(exc, facts, credentials)
                if failure is None:
                    raise
                raise failure from exc
            finally:
                if credentials.tracer is not None:
                    credentials.tracer.finish(connection)
    except BaseException:
        raw.close()
        raise
    done = time.perf_counter()
    return DeviceConnection(
        TlsConnection(connection, raw),
        connected - started,
        done - connected,
        accepted,
        connection.get_group_name(),
        facts.peer_signature if facts else None,
        facts.bytes_on_wire if facts else 0,
    )


def _client_connection(credentials: DeviceTls, raw: socket.socket, name: str) -> SSL.Connection:
    connection = SSL.Connection(credentials.context, raw)
    credentials.use_identity(connection)
    encoded = name.encode("idna")
    if not _is_ip_address(name):
        connection.set_tlsext_host_name(encoded)
    if credentials.check_hostname:
        # OpenSSL checks the name during verification, as Python's ssl does (pyOpenSSL has no
        # public call for it): a mismatch is a verify failure, code 62.
        param = _lib.SSL_get0_param(connection._ssl)
        if _is_ip_address(name):
            packed = socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
            _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
        else:
            _lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded))
    connection.set_connect_state()
    return connection


def _is_ip_address(name: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
    except OSError:
        return False
    return True


async def _drive_handshake(
    loop: asyncio.AbstractEventLoop, connection: SSL.Connection, raw: socket.socket
) -> None:
    while True:
        try:
            connection.do_handshake()
            return
        except SSL.WantReadError:
            await wait_ready(loop, raw, readable=True)
        except SSL.WantWriteError:
            await wait_ready(loop, raw, readable=False)
        except (SSL.SysCallError, SSL.Error) as exc:
            raise _as_ssl_error(exc, connection) from exc


# How long a TLS 1.3 client waits for the broker's word on its certificate before it speaks.
_VERDICT_GRACE_SECONDS = 0.2


async def _await_verdict(
    loop: asyncio.AbstractEventLoop, connection: SSL.Connection, raw: socket.socket
) -> bool:
    """In TLS 1.3 the client's handshake ends before the broker has checked its certificate.
    A broker that refuses it sends an alert and closes; had the client already sent CONNECT,
    the broker's kernel answers the unread bytes with a reset that destroys the alert, and the
    refusal reads as ``connection_closed`` (Mosquitto: 1 in 2 refusals in a CI run). So the
    device first waits for the broker's first word: its session tickets (accepted: ~1 round
    trip) or its alert (raised here, as in the handshake). A broker that sends no tickets costs
    the grace once per connection.

    True when the broker is known to have accepted the certificate: TLS 1.2, or tickets read.
    """
    if connection.get_protocol_version_name() != "TLSv1.3":
        return True  # TLS 1.2: the broker's Finished already came after its check
    try:
        async with asyncio.timeout(_VERDICT_GRACE_SECONDS):
            await wait_ready(loop, raw, readable=True)
    except TimeoutError:
        return False  # no word: what follows (CONNACK, or the end) tells
    try:
        connection.recv(1, socket.MSG_PEEK)  # processes tickets or the alert, consumes nothing
    except (SSL.WantReadError, SSL.WantWriteError):
        return True  # what came was a ticket: the broker accepted the certificate
    except (SSL.ZeroReturnError, SSL.SysCallError):
        return False  # closed without an alert: what follows tells as before
    except SSL.Error as exc:
        raise _as_ssl_error(exc, connection) from exc
    return True  # application data already (a broker that speaks first): accepted


class NegotiationFailure(ssl.SSLError):
    """The broker and the device had no key-exchange group, or no signature algorithm for the
    device's certificate, in common: ``reason`` is ``no_shared_group`` or
    ``no_shared_signature_algorithm``."""


def _negotiation_failure(
    exc: ssl.SSLError, facts: HandshakeFacts | None, credentials: DeviceTls
) -> NegotiationFailure | None:
    """What a refusal means when the handshake says more than its alert.

    ``handshake_failure`` before any ServerHello: the broker took none of the offered groups
    (the device offers all of OpenSSL's cipher suites and signature schemes; groups are what
    it narrows). ``certificate_required`` after the device sent an empty Certificate although
    it holds one: none of the schemes the broker accepts can sign with its key (an ML-DSA
    device before a broker on OpenSSL 3.0)."""
    if facts is None:
        return None
    alert = getattr(exc, "reason", "") or ""
    offered = ", ".join(credentials.groups) or "P-256"
    if alert.endswith("ALERT_HANDSHAKE_FAILURE") and not facts.server_hello_seen:
        failure = NegotiationFailure(
            1, f"the broker accepts none of the key-exchange groups offered ({offered})"
        )
        failure.reason = "no_shared_group"
        return failure
    if facts.sent_empty_certificate and credentials.certificate is not None:
        failure = NegotiationFailure(
            1,
            f"the broker accepts no signature scheme the device's {credentials.key_kind} key "
            "can make, so the device could present no certificate",
        )
        failure.reason = "no_shared_signature_algorithm"
        return failure
    return None


def _as_ssl_error(exc: Exception, connection: SSL.Connection) -> OSError:
    """What Python's ``ssl`` raises for the same event."""
    if isinstance(exc, SSL.WantReadError):
        return ssl.SSLWantReadError("The operation did not complete (read)")
    if isinstance(exc, SSL.WantWriteError):
        return ssl.SSLWantWriteError("The operation did not complete (write)")
    if isinstance(exc, SSL.SysCallError):
        code, message = (*exc.args, None, "")[:2]
        if isinstance(code, int) and code > 0:
            return OSError(code, message)  # ConnectionResetError, BrokenPipeError …
        return ssl.SSLEOFError("EOF occurred in violation of protocol")
    reasons = [str(r[2]) for r in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])
               if isinstance(r, tuple) and len(r) == 3]  # fmt: skip
    verify_code = _lib.SSL_get_verify_result(connection._ssl)
    if verify_code != 0 and any("certificate verify failed" in r for r in reasons):
        message = _ffi.string(_lib.X509_verify_cert_error_string(verify_code)).decode()
        failure = ssl.SSLCertVerificationError(
            1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
        )
        failure.verify_code, failure.verify_message = verify_code, message
        failure.reason = "CERTIFICATE_VERIFY_FAILED"
        return failure
    words = reasons[-1] if reasons else "unknown error"
    reason = words.upper().replace(" ", "_").replace("/", "_")  # as Python's ssl spells it
    error = ssl.SSLError(1, f"[SSL: {reason}] {words}")
    error.reason = reason
    return error

"""TCP connect and TLS handshake without blocking the event loop.

paho's own ``connect`` performs a blocking handshake, which would serialise thousands of
devices. Here the handshake is driven step by step on a non-blocking socket, so many devices
handshake concurrently on one loop; the finished socket is then handed to paho.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
    family, address = await _resolve(loop, host, port)
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.setblocking(False)
    sock: socket.socket = raw
    try:
        if source_ip:
            raw.bind((source_ip, 0))
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            await loop.sock_connect(raw, address)
            connected = time.perf_counter()
            if on_connected is not None:
                local = raw.getsockname()
                on_connected(f"{local[0]}:{local[1]}")
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
    loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, *, readable: bool
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

"""A raw MQTT 3.1.1 client over TLS for hostile tests: it sends exactly the bytes it is told.

paho and Mosquitto's clients refuse to send malformed packets; an attacker's client does not.
Packets are built here by hand (the encoding is the standard's, nothing of the broker's).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from benchmarks.mqtt_load import remaining_length
from tests.broker_support import Credentials, tls_context


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + remaining_length(len(body)) + body


def utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect(
    client_id: str,
    *,
    clean: bool = True,
    keep_alive: int = 60,
    will: tuple[str, bytes] | None = None,
    will_qos: int = 0,
    will_retain: bool = False,
) -> bytes:
    flags = 0x02 if clean else 0
    payload = utf8(client_id)
    if will is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
        payload += utf8(will[0]) + struct.pack("!H", len(will[1])) + will[1]
    body = utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive) + payload
    return packet(0x10, body)


def connect_v5(client_id: str) -> bytes:
    """An MQTT 5 CONNECT with properties (session expiry interval), as mosquitto_pub -V 5 sends."""
    properties = b"\x11\x00\x00\x00\x3c"
    body = (
        utf8("MQTT")
        + bytes([5, 0x02])
        + struct.pack("!H", 60)
        + bytes([len(properties)])
        + properties
        + b"\x00"  # no will properties … the payload's client id follows
        + utf8(client_id)
    )
    return packet(0x10, body)


def publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 1) -> bytes:
    body = utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


def subscribe(packet_id: int, *filters: tuple[str, int]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(utf8(f) + bytes([q]) for f, q in filters)
    return packet(0x82, body)


def puback(packet_id: int) -> bytes:
    return packet(0x40, struct.pack("!H", packet_id))


DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


@dataclass
class Received:
    kind: int
    flags: int
    body: bytes

    @property
    def topic(self) -> str:
        (length,) = struct.unpack("!H", self.body[:2])
        return self.body[2 : 2 + length].decode()

    @property
    def payload(self) -> bytes:
        (length,) = struct.unpack("!H", self.body[:2])
        start = 2 + length + (2 if (self.flags >> 1) & 3 else 0)
        return self.body[start:]

    @property
    def packet_id(self) -> int:
        (length,) = struct.unpack("!H", self.body[:2])
        return int(struct.unpack("!H", self.body[2 + length : 4 + length])[0])


class RawClient:
    """One TLS connection with a device's certificate; send bytes, read whole packets."""

    def __init__(self, port: int, ca: object, creds: Credentials, *, timeout: float = 5) -> None:
        context: ssl.SSLContext = tls_context(ca, creds)  # type: ignore[arg-type]
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return False
        except OSError as exc:  # reset, or a TLS alert: the broker ended the connection
            raise EOFError(str(exc)) from exc
        if not chunk:
            raise EOFError
        self._buffer += chunk
        return True

    def read(self, timeout: float = 5) -> Received | None:
        """The next packet, None on timeout; EOFError when the broker closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = self._take()
            if parsed is not None:
                return parsed
            if time.monotonic() >= deadline or not self._fill(deadline):
                return None

    def _take(self) -> Received | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        length, multiplier, index = 0, 1, 1
        while True:
            if index >= len(buffer):
                return None
            byte = buffer[index]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            index += 1
            if not byte & 0x80:
                break
        if len(buffer) < index + length:
            return None
        self._buffer = buffer[index + length :]
        return Received(buffer[0] >> 4, buffer[0] & 0x0F, buffer[index : index + length])

    def connack(self, timeout: float = 5) -> tuple[int, int]:
        """(session present, return code) of the CONNACK."""
        answer = self.read(timeout)
        assert answer is not None and answer.kind == 2, f"no CONNACK: {answer}"
        return answer.body[0], answer.body[1]

    def closed_within(self, seconds: float) -> bool:
        """Whether the broker closes the connection within ``seconds`` (packets are skipped)."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.read(deadline - time.monotonic())
        except EOFError:
            return True
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

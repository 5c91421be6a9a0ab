"""A minimal asyncio MQTT-over-TLS load client, the same one against every broker.

Each connection uses its own device certificate (an ``ssl.SSLContext`` per device, prepared
before timing): TCP connect, TLS handshake, CONNECT, CONNACK, then DISCONNECT or hold.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from broker.packets import encode_length
from fleet.kernel.tls import device_tls_context

remaining_length = encode_length  # MQTT's variable-length integer [MQTT-2.2.3]


def connect_packet(client_id: str, *, keepalive: int = 60) -> bytes:
    """An MQTT 3.1.1 CONNECT with clean session and no credentials."""
    identifier = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big")
    body += len(identifier).to_bytes(2, "big") + identifier
    return b"\x10" + remaining_length(len(body)) + body


DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"


def device_context(root_cert: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The device's Python ``ssl`` client context, as the kernel builds every client context."""
    return device_tls_context(root_cert, cert, key, device_id=cert.parent.name)


@dataclass
class ChurnResult:
    attempts: int = 0
    successes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.successes / self.seconds if self.seconds else 0.0


async def open_session(
    host: str, port: int, context: ssl.SSLContext, client_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS + CONNECT; returns the streams once CONNACK accepted the session."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname="localhost"
    )
    writer.write(connect_packet(client_id))
    connack = await reader.readexactly(4)
    if connack[0] != 0x20 or connack[3] != 0:
        writer.close()
        raise ConnectionRefusedError(f"CONNACK return code {connack[3]}")
    return reader, writer


async def _one(
    host: str, port: int, context: ssl.SSLContext, client_id: str, result: ChurnResult
) -> None:
    started = time.perf_counter()
    result.attempts += 1
    try:
        _, writer = await open_session(host, port, context, client_id)
        writer.write(DISCONNECT)
        await writer.drain()
        writer.close()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
        name = type(exc).__name__
        result.failures[name] = result.failures.get(name, 0) + 1
        return
    result.successes += 1
    result.latencies.append(time.perf_counter() - started)


async def churn(
    host: str, port: int, devices: list[tuple[str, ssl.SSLContext]], *, in_flight: int = 50
) -> ChurnResult:
    """Connect and disconnect once per device, ``in_flight`` at a time."""
    result = ChurnResult()
    queue = iter(devices)
    started = time.perf_counter()

    async def worker() -> None:
        for client_id, context in queue:
            await _one(host, port, context, client_id, result)

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    result.seconds = time.perf_counter() - started
    return result


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body)."""
    first = (await reader.readexactly(1))[0]
    length, multiplier = 0, 1
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


def subscribe_packet(topic_filter: str, *, packet_id: int = 1, qos: int = 0) -> bytes:
    encoded = topic_filter.encode()
    body = packet_id.to_bytes(2, "big") + len(encoded).to_bytes(2, "big") + encoded + bytes([qos])
    return b"\x82" + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    """QoS 0 PUBLISH."""
    encoded = topic.encode()
    body = len(encoded).to_bytes(2, "big") + encoded + payload
    return b"\x30" + remaining_length(len(body)) + body


def publish_payload(body: bytes, qos: int = 0) -> bytes:
    """The payload of a PUBLISH body (QoS 1 and 2 carry a packet id after the topic)."""
    topic_length = int.from_bytes(body[:2], "big")
    start = 2 + topic_length + (2 if qos else 0)
    return body[start:]


def puback_for(body: bytes) -> bytes:
    """The PUBACK that acknowledges a QoS 1 PUBLISH body."""
    topic_length = int.from_bytes(body[:2], "big")
    return b"\x40\x02" + body[2 + topic_length : 4 + topic_length]

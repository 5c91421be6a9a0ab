"""MQTT 3.1.1 framing, validation and encoding.

The broker reads every client packet here first: :class:`PacketFramer` cuts the plaintext
stream into whole packets (refusing a malformed remaining length or a packet over the size
limit as soon as its header arrives), :func:`parse_connect` reads a CONNECT in full so the
broker can decide who the client is *before* any session is touched, and
:func:`packet_problem` names what is wrong with any later packet (reserved types, bad flags,
QoS 3, wildcards in a topic name, lengths that run past the packet …). A problem closes the
connection; the engine never has to guess.

Everything here is pure and bounded: no I/O, no unbounded allocation (a packet is buffered
only once its announced length passed the limit check).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

MQTT_3_1_1 = 4
_MAX_REMAINING_LENGTH_BYTES = 4
_SERVER_ONLY = {CONNACK: "CONNACK", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK", PINGRESP: "PINGRESP"}
# Fixed-header flags every packet type must carry [MQTT-2.2.2-1]; PUBLISH's are checked apart.
_REQUIRED_FLAGS = {
    CONNECT: 0,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBSCRIBE: 2,
    UNSUBSCRIBE: 2,
    PINGREQ: 0,
    DISCONNECT: 0,
}
_ACK_TYPES = (PUBACK, PUBREC, PUBREL, PUBCOMP)


class ConnackCode(enum.IntEnum):
    """CONNACK return codes of MQTT 3.1.1 (section 3.2.2.3)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


class ProtocolViolation(Exception):
    """The client broke MQTT 3.1.1; the message says how (it goes into the broker's event)."""


class PacketTooLarge(ProtocolViolation):
    """A packet announced more bytes than the broker accepts."""


class UnsupportedProtocol(ProtocolViolation):
    """A well-formed CONNECT of another protocol version (MQTT 5, MQTT 3.1): CONNACK 0x01."""


class Packet(NamedTuple):
    """One whole control packet: its type, fixed-header flags, body and the bytes as received
    (a tuple: the framer makes one per packet, and a tuple is the cheapest to make)."""

    kind: int
    flags: int
    raw: bytes
    header_size: int

    @property
    def body(self) -> bytes:
        return self.raw[self.header_size :]


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    message: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A CONNECT, read in full."""

    client_id: str
    clean_session: bool
    keep_alive: int  # seconds; 0 turns keep alive off
    will: Will | None
    username: str | None
    password: bytes | None


class PacketFramer:
    """Cuts a byte stream into whole packets; ``max_bytes`` bounds each (header included)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received that do not make a whole packet yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Packet]:
        """The packets ``data`` completes (ProtocolViolation at the first malformed header)."""
        buffer = self._buffer
        buffer += data
        packets: list[Packet] = []
        start = 0
        end = len(buffer)
        while end - start >= 2:
            header = _remaining_length(buffer, start + 1, end)
            if header is None:
                break  # the length is not all here yet
            length, body_start = header
            size = body_start - start + length
            if size > self.max_bytes:
                raise PacketTooLarge(
                    f"packet of {size} bytes exceeds the {self.max_bytes}-byte limit"
                )
            if end - start < size:
                break
            first = buffer[start]
            raw = bytes(buffer[start : start + size])
            packets.append(Packet(first >> 4, first & 0x0F, raw, body_start - start))
            start += size
        if start:
            del buffer[:start]
        return packets


def _remaining_length(buffer: bytearray, offset: int, end: int) -> tuple[int, int] | None:
    """(remaining length, offset of the body) or None while incomplete [MQTT-2.2.3]."""
    length, multiplier = 0, 1
    for index in range(_MAX_REMAINING_LENGTH_BYTES):
        if offset + index >= end:
            return None
        byte = buffer[offset + index]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return length, offset + index + 1
        multiplier *= 128
    raise ProtocolViolation("malformed remaining length (more than 4 bytes)")


class _Body:
    """A cursor over a packet body whose every read is bounds-checked."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    @property
    def left(self) -> int:
        return len(self.data) - self.offset

    def take(self, count: int, field: str) -> bytes:
        if count > self.left:
            raise ProtocolViolation(
                f"{self.what}: {field} needs {count} bytes, only {self.left} left in the packet"
            )
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return chunk

    def byte(self, field: str) -> int:
        return self.take(1, field)[0]

    def uint16(self, field: str) -> int:
        value: int = struct.unpack("!H", self.take(2, field))[0]
        return value

    def binary(self, field: str) -> bytes:
        return self.take(self.uint16(f"{field} length"), field)

    def string(self, field: str) -> str:
        raw = self.binary(field)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation(f"{self.what}: {field} is not valid UTF-8") from None
        if "\x00" in text:
            raise ProtocolViolation(f"{self.what}: {field} contains U+0000")
        return text

    def packet_id(self) -> int:
        packet_id = self.uint16("packet identifier")
        if packet_id == 0:
            raise ProtocolViolation(f"{self.what}: packet identifier 0")
        return packet_id

    def end(self) -> None:
        if self.left:
            raise ProtocolViolation(f"{self.what}: {self.left} unexpected bytes at the end")


def parse_connect(body: bytes) -> ConnectRequest:
    """Read a CONNECT body in full (ProtocolViolation, or UnsupportedProtocol for MQTT 5/3.1)."""
    reader = _Body(body, "CONNECT")
    name = reader.string("protocol name")
    level = reader.byte("protocol level")
    if (name, level) in (("MQTT", 5), ("MQIsdp", 3)):
        version = "MQTT 5" if level == 5 else "MQTT 3.1"
        raise UnsupportedProtocol(f"{version} is not supported: this broker speaks MQTT 3.1.1")
    if name != "MQTT":
        raise ProtocolViolation(f"CONNECT: protocol name {name!r} is not 'MQTT'")
    if level != MQTT_3_1_1:
        raise UnsupportedProtocol(f"protocol level {level} is not supported (MQTT 3.1.1 is 4)")
    flags = reader.byte("connect flags")
    keep_alive = reader.uint16("keep alive")
    if flags & 0x01:
        raise ProtocolViolation("CONNECT: the reserved flag is set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if will_qos == 3:
        raise ProtocolViolation("CONNECT: will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise ProtocolViolation("CONNECT: will QoS or retain set without a will")
    if has_password and not has_username:
        raise ProtocolViolation("CONNECT: a password without a user name")
    client_id = reader.string("client identifier")
    will = None
    if will_flag:
        topic = reader.string("will topic")
        problem = topic_name_problem(topic)
        if problem:
            raise ProtocolViolation(f"CONNECT: will topic {topic!r}: {problem}")
        will = Will(topic, reader.binary("will message"), will_qos, will_retain)
    username = reader.string("user name") if has_username else None
    password = reader.binary("password") if has_password else None
    reader.end()
    return ConnectRequest(
        client_id=client_id,
        clean_session=bool(flags & 0x02),
        keep_alive=keep_alive,
        will=will,
        username=username,
        password=password,
    )


def topic_name_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be a PUBLISH topic name (None: it can) [MQTT-4.7]."""
    if not topic:
        return "empty topic name"
    if "+" in topic or "#" in topic:
        return "wildcard in a topic name"
    return None


def topic_filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid subscription filter (None: it is) [MQTT-4.7.1]."""
    if not topic_filter:
        return "empty topic filter"
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "'#' must be a whole level, and the last"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def header_problem(packet: Packet) -> str | None:
    """What is wrong with the type or fixed header of a packet a connected client sent (None:
    nothing); the body of a PUBLISH, acknowledgement, SUBSCRIBE or UNSUBSCRIBE is checked as it
    is parsed (:func:`parse_publish` …)."""
    kind = packet.kind
    if kind in (0, 15):
        return f"reserved packet type {kind}"
    if kind in _SERVER_ONLY:
        return f"{_SERVER_ONLY[kind]} is sent by servers only"
    if kind == CONNECT:
        return "a second CONNECT"
    required = _REQUIRED_FLAGS.get(kind)
    if required is not None and packet.flags != required:
        return f"packet type {kind} with flags {packet.flags:#06b} (must be {required:#06b})"
    if kind in (PINGREQ, DISCONNECT) and len(packet.raw) > packet.header_size:
        return f"packet type {kind} with a {len(packet.body)}-byte body (must be empty)"
    return None


def packet_problem(packet: Packet) -> str | None:
    """What is wrong with a packet a connected client sent, header and body (None: nothing)."""
    problem = header_problem(packet)
    if problem is not None:
        return problem
    try:
        if packet.kind == PUBLISH:
            parse_publish(packet)
        elif packet.kind in _ACK_TYPES:
            parse_ack(packet)
        elif packet.kind == SUBSCRIBE:
            parse_subscribe(packet.body)
        elif packet.kind == UNSUBSCRIBE:
            parse_unsubscribe(packet.body)
    except ProtocolViolation as exc:
        return str(exc)
    return None


def publish_qos(packet: Packet) -> int:
    return (packet.flags >> 1) & 0x03


class Publication(NamedTuple):
    """A client's PUBLISH, read in full."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int  # 0 for QoS 0


def parse_publish(packet: Packet) -> Publication:
    """Read and check a PUBLISH (ProtocolViolation names what is wrong).

    The common case is read by slicing; anything unusual goes through the bounds-checked
    reader, which names the problem.
    """
    raw, start, flags = packet.raw, packet.header_size, packet.flags
    qos = (flags >> 1) & 0x03
    topic_end = start + 2 + ((raw[start] << 8) | raw[start + 1]) if len(raw) >= start + 2 else 0
    payload_start = topic_end + (2 if qos else 0)
    if topic_end and payload_start <= len(raw) and qos != 3 and (qos or not flags & 0x08):
        try:
            topic = raw[start + 2 : topic_end].decode("utf-8")
        except UnicodeDecodeError:
            topic = ""
        packet_id = (raw[topic_end] << 8) | raw[topic_end + 1] if qos else 0
        if topic and (packet_id or not qos) and not _has_forbidden(topic):
            return Publication(topic, raw[payload_start:], qos, bool(flags & 0x01), packet_id)
    return _parse_publish_checked(packet)


def _has_forbidden(topic: str) -> bool:
    return "+" in topic or "#" in topic or "\x00" in topic


def _parse_publish_checked(packet: Packet) -> Publication:
    flags = packet.flags
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolViolation("PUBLISH with QoS 3")
    if qos == 0 and flags & 0x08:
        raise ProtocolViolation("PUBLISH with QoS 0 and DUP set")
    body = _Body(packet.body, "PUBLISH")
    topic = body.string("topic name")
    problem = topic_name_problem(topic)
    if problem:
        raise ProtocolViolation(f"PUBLISH to {topic!r}: {problem}")
    packet_id = body.packet_id() if qos else 0
    return Publication(topic, body.data[body.offset :], qos, bool(flags & 0x01), packet_id)


def parse_ack(packet: Packet) -> int:
    """The packet identifier of a PUBACK, PUBREC, PUBREL or PUBCOMP."""
    body = _Body(packet.body, f"packet type {packet.kind}")
    packet_id = body.packet_id()
    body.end()
    return packet_id


def parse_subscribe(data: bytes) -> tuple[int, list[tuple[str, int]]]:
    """A SUBSCRIBE body: its packet identifier and (filter, requested QoS) pairs."""
    body = _Body(data, "SUBSCRIBE")
    packet_id = body.packet_id()
    requests = [(f, body.byte("requested QoS")) for f in _filters(body, "SUBSCRIBE")]
    for topic_filter, requested in requests:
        if requested > 2:
            raise ProtocolViolation(
                f"SUBSCRIBE of {topic_filter!r}: requested QoS byte {requested:#04x}"
            )
    return packet_id, requests


def parse_unsubscribe(data: bytes) -> tuple[int, list[str]]:
    """An UNSUBSCRIBE body: its packet identifier and filters."""
    body = _Body(data, "UNSUBSCRIBE")
    packet_id = body.packet_id()
    return packet_id, list(_filters(body, "UNSUBSCRIBE"))


def _filters(body: _Body, what: str) -> Iterator[str]:
    """The topic filters of a SUBSCRIBE (each followed by a QoS byte the caller reads) or an
    UNSUBSCRIBE."""
    if not body.left:
        raise ProtocolViolation(f"{what} without a topic filter")
    while body.left:
        topic_filter = body.string("topic filter")
        problem = topic_filter_problem(topic_filter)
        if problem:
            raise ProtocolViolation(f"{what} of {topic_filter!r}: {problem}")
        yield topic_filter


def connack(code: ConnackCode) -> bytes:
    """A CONNACK with session present 0 (every refusal's) [MQTT-3.2.2-4]."""
    return encode_connack(code)


# -- what the broker sends ---------------------------------------------------------------------

PINGRESP_PACKET = bytes((PINGRESP << 4, 0))


def encode_length(length: int) -> bytes:
    """The remaining-length field [MQTT-2.2.3]."""
    if length < 128:
        return bytes((length,))
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def encode_topic(topic: str) -> bytes:
    """A topic name as it appears in a PUBLISH: two length bytes, then UTF-8."""
    encoded = topic.encode()
    return len(encoded).to_bytes(2, "big") + encoded


def encode_publish(
    topic_field: bytes, payload: bytes, qos: int, packet_id: int, *, retain: bool, dup: bool
) -> bytes:
    """A PUBLISH; ``topic_field`` from :func:`encode_topic`."""
    first = (PUBLISH << 4) | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    if qos:
        length = len(topic_field) + 2 + len(payload)
        return b"".join(
            (bytes((first,)), encode_length(length), topic_field, packet_id.to_bytes(2, "big"),
             payload)
        )  # fmt: skip
    return b"".join((bytes((first,)), encode_length(len(topic_field) + len(payload)), topic_field,
                     payload))  # fmt: skip


def encode_ack(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL (flags 0b0010), PUBCOMP or UNSUBACK."""
    flags = 0x02 if kind == PUBREL else 0
    return bytes(((kind << 4) | flags, 2)) + packet_id.to_bytes(2, "big")


def encode_suback(packet_id: int, codes: list[int]) -> bytes:
    body = packet_id.to_bytes(2, "big") + bytes(codes)
    return bytes((SUBACK << 4,)) + encode_length(len(body)) + body


def encode_connack(code: ConnackCode, *, session_present: bool = False) -> bytes:
    return bytes((CONNACK << 4, 2, 1 if session_present else 0, int(code)))

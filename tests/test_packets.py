"""The broker's MQTT reader (broker.packets): property-based, then live against random bytes."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import BrokerSettings
from broker.packets import (
    Packet,
    PacketFramer,
    PacketTooLarge,
    ProtocolViolation,
    UnsupportedProtocol,
    _parse_publish_checked,
    encode_length,
    encode_publish,
    encode_topic,
    packet_problem,
    parse_connect,
    parse_publish,
    topic_filter_problem,
)
from fleet import ProvisionSpec, Workspace, provision_devices
from tests import mqtt_raw as mq
from tests.broker_support import BrokerThread, device_credentials, tls_context

_characters = st.characters(min_codepoint=1, max_codepoint=0x2FFF, exclude_categories=["Cs"])
client_ids = st.text(_characters, max_size=30)
topics = st.text(
    _characters,
    min_size=1,
    max_size=40,
).filter(lambda t: "+" not in t and "#" not in t)


@given(st.binary(max_size=300))
def test_random_connect_bodies_parse_or_are_refused_by_name(body: bytes) -> None:
    try:
        request = parse_connect(body)
    except ProtocolViolation as exc:
        assert str(exc)
    else:
        assert request.keep_alive >= 0


@given(
    client_id=client_ids,
    clean=st.booleans(),
    keep_alive=st.integers(0, 65535),
    will=st.none() | st.tuples(topics, st.binary(max_size=50)),
    will_qos=st.integers(0, 2),
    will_retain=st.booleans(),
)
def test_a_well_formed_connect_reads_back_exactly(
    client_id: str,
    clean: bool,
    keep_alive: int,
    will: tuple[str, bytes] | None,
    will_qos: int,
    will_retain: bool,
) -> None:
    data = mq.connect(
        client_id,
        clean=clean,
        keep_alive=keep_alive,
        will=will,
        will_qos=will_qos if will else 0,
        will_retain=will_retain and will is not None,
    )
    (packet,) = PacketFramer(1 << 20).feed(data)
    request = parse_connect(packet.body)
    assert (request.client_id, request.clean_session, request.keep_alive) == (
        client_id,
        clean,
        keep_alive,
    )
    if will is None:
        assert request.will is None
    else:
        assert request.will is not None
        assert (request.will.topic, request.will.message) == will
        assert (request.will.qos, request.will.retain) == (will_qos, will_retain)


def test_mqtt5_and_mqtt31_are_unsupported_versions_not_garbage() -> None:
    (v5,) = PacketFramer(1 << 20).feed(mq.connect_v5("dev-00001"))
    with pytest.raises(UnsupportedProtocol, match="MQTT 5"):
        parse_connect(v5.body)
    v31 = mq.utf8("MQIsdp") + bytes([3, 2, 0, 60]) + mq.utf8("x")
    with pytest.raises(UnsupportedProtocol, match=r"MQTT 3\.1"):
        parse_connect(v31)


@given(st.lists(st.tuples(topics, st.binary(max_size=200)), max_size=10), st.data())
def test_any_chunking_of_a_stream_gives_the_same_packets(
    messages: list[tuple[str, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(mq.publish(topic, payload) for topic, payload in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    framer = PacketFramer(1 << 20)
    packets = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        packets += framer.feed(stream[start:end])
    assert b"".join(p.raw for p in packets) == stream
    assert framer.buffered == 0
    assert all(packet_problem(p) is None for p in packets)


@given(st.binary(max_size=400))
def test_random_streams_frame_or_fail_by_name_and_never_buffer_past_the_limit(
    data: bytes,
) -> None:
    framer = PacketFramer(64)
    try:
        for packet in framer.feed(data):
            assert len(packet.raw) <= 64
            problem = packet_problem(packet)
            assert problem is None or problem
    except ProtocolViolation as exc:
        assert str(exc)
    assert framer.buffered <= 64 + 5


@given(st.integers(0, 15), st.binary(max_size=60))
def test_the_fast_publish_reader_agrees_with_the_checked_one(flags: int, body: bytes) -> None:
    """Whatever the bytes, the sliced read of a PUBLISH gives what the bounds-checked reader
    gives, or both refuse it."""
    raw = bytes((0x30 | flags,)) + encode_length(len(body)) + body
    packet = Packet(3, flags, raw, len(raw) - len(body))
    try:
        expected = _parse_publish_checked(packet)
    except ProtocolViolation:
        with pytest.raises(ProtocolViolation):
            parse_publish(packet)
        return
    assert parse_publish(packet) == expected


@given(topics, st.binary(max_size=200), st.integers(0, 2), st.integers(1, 65535), st.booleans())
def test_an_encoded_publish_reads_back(
    topic: str, payload: bytes, qos: int, packet_id: int, retain: bool
) -> None:
    raw = encode_publish(encode_topic(topic), payload, qos, packet_id, retain=retain, dup=False)
    (packet,) = PacketFramer(1 << 20).feed(raw)
    read = parse_publish(packet)
    assert (read.topic, read.payload, read.qos, read.retain) == (topic, payload, qos, retain)
    assert read.packet_id == (packet_id if qos else 0)


def test_a_huge_announced_length_is_refused_from_its_header() -> None:
    with pytest.raises(PacketTooLarge, match="268435460 bytes"):
        PacketFramer(1024).feed(b"\x30\xff\xff\xff\x7f")


@pytest.mark.parametrize(
    ("topic_filter", "valid"),
    [("a/#", True), ("#", True), ("+/b/+", True), ("a/#/b", False), ("a/b#", False), ("a+", False),
     ("", False)],
)  # fmt: skip
def test_topic_filters(topic_filter: str, valid: bool) -> None:
    assert (topic_filter_problem(topic_filter) is None) is valid


# -- live: random bytes at a real broker ---------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_target(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Workspace, BrokerThread]]:
    from fleet import FleetConfig, init_workspace

    root = tmp_path_factory.mktemp("fuzz") / "fleet"
    init_workspace(root, config=FleetConfig())
    workspace = Workspace.open(root)
    provision_devices(workspace, ProvisionSpec(count=2, prefix="dev"))
    broker = BrokerThread(
        BrokerSettings(
            workspace=root, port=0, metrics_port=None, handshake_timeout=0.5, event_log=False
        )
    )
    yield workspace, broker
    broker.stop()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@pytest.mark.slow
@given(
    prefix=st.sampled_from([b"", b"\x10", mq.connect("dev-00001")]), noise=st.binary(max_size=200)
)
def test_random_bytes_never_hang_or_crash_the_broker(
    fuzz_target: tuple[Workspace, BrokerThread], prefix: bytes, noise: bytes
) -> None:
    """Whatever follows the handshake (after a valid CONNECT or not), the connection ends in a
    close or stays a working session, within the handshake timeout; the broker serves on."""
    workspace, broker = fuzz_target
    context = tls_context(workspace.paths.root_cert, device_credentials(workspace, "dev-00001"))
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.settimeout(1.0)
        tls.sendall(prefix + noise)
        started = time.monotonic()
        ended = False
        while time.monotonic() - started < 3:
            try:
                if not tls.recv(4096):
                    ended = True
                    break
            except (TimeoutError, ssl.SSLWantReadError):
                break
            except OSError:
                ended = True
                break
        if not ended:  # still open: only a well-formed session may be (a CONNECT was admitted)
            assert prefix == mq.connect("dev-00001"), "a connection without CONNECT stayed open"
    probe = mq.RawClient(
        broker.port, workspace.paths.root_cert, device_credentials(workspace, "dev-00002")
    )
    try:
        probe.send(mq.connect("dev-00002"))
        assert probe.connack() == (0, 0)
    finally:
        probe.close()

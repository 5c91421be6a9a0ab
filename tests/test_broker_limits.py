"""Per-client resource bounds of the broker, through ``fleet broker`` as a user runs it."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.broker import ours
from benchmarks.flood import measure_flood
from broker import launched_broker
from fleet import FleetConfig, ProvisionSpec, Workspace, init_workspace, provision_devices
from fleet.store.claims import ClaimRules, create_claim
from tests import mqtt_raw as mq
from tests.broker_support import Credentials, device_credentials
from tests.conftest import fleet_command
from tests.mqtt_raw import RawClient


@dataclass
class CliBroker:
    port: int
    metrics_url: str

    def metric(self, name: str, labels: str) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            body = response.read().decode()
        match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", body, re.M)
        return float(match[1]) if match else 0.0


@pytest.fixture
def small_limits_broker(workspace: Workspace) -> Iterator[CliBroker]:
    provision_devices(workspace, ProvisionSpec(count=1, prefix="dev"))
    provision_devices(workspace, ProvisionSpec(count=1, prefix="gw", tier="gold"))
    create_claim(workspace, ClaimRules("batch-1"))
    with launched_broker(
        workspace.paths.root,
        "--max-packet-size", "4096", "--max-queued-messages", "50",
        "--max-inflight-messages", "5", "--max-claim-sessions", "2",
        metrics=True,
    ) as broker:  # fmt: skip
        assert broker.metrics_url is not None
        yield CliBroker(broker.port, broker.metrics_url)
    process = broker.process
    assert process.returncode == 0


def test_in_flight_window_queue_bound_and_packet_size_from_the_command_line(
    workspace: Workspace, small_limits_broker: CliBroker
) -> None:
    port, ca = small_limits_broker.port, workspace.paths.root_cert
    subscriber = RawClient(port, ca, device_credentials(workspace, "dev-00001"))
    gold = RawClient(port, ca, device_credentials(workspace, "gw-00001"))
    try:
        subscriber.send(mq.connect("dev-00001"))
        assert subscriber.connack() == (0, 0)
        subscriber.send(mq.subscribe(1, ("devices/dev-00001/commands", 1)))
        assert subscriber.read() is not None  # SUBACK
        gold.send(mq.connect("gw-00001"))
        assert gold.connack() == (0, 0)
        for index in range(1, 101):  # 100 commands, each acknowledged by the broker
            gold.send(
                mq.publish("devices/dev-00001/commands", b"%d" % index, qos=1, packet_id=index)
            )
            ack = gold.read()
            assert ack is not None and ack.kind == 4

        def received_until_quiet() -> list[mq.Received]:
            packets = []
            while (packet := subscriber.read(0.5)) is not None:
                packets.append(packet)
            return packets

        first = received_until_quiet()  # unacknowledged: only the in-flight window
        assert [p.payload for p in first] == [b"%d" % i for i in range(1, 6)]
        assert (
            small_limits_broker.metric("mtls_messages_dropped_total", 'reason="queue_full"')
            == 100 - 5 - 50
        )
        delivered = list(first)
        while len(delivered) < 55:  # acknowledging moves the window over the queued 50
            for packet in delivered[-5:]:
                subscriber.send(mq.puback(packet.packet_id))
            more = received_until_quiet()
            assert more, f"stalled after {len(delivered)}"
            delivered += more
        assert [p.payload for p in delivered] == [b"%d" % i for i in range(1, 56)]

        gold.send(mq.publish("devices/dev-00001/commands", b"x" * 5000, qos=1, packet_id=200))
        assert gold.closed_within(1)
        assert (
            small_limits_broker.metric(
                "mtls_sessions_closed_by_broker_total", 'reason="protocol_error"'
            )
            == 1
        )
    finally:
        subscriber.close()
        gold.close()


def test_one_claim_certificate_holds_a_bounded_number_of_sessions(
    workspace: Workspace, small_limits_broker: CliBroker
) -> None:
    bundle = workspace.paths.claim_dir("batch-1")
    claim = Credentials("batch-1", bundle / "cert.pem", bundle / "key.pem")
    port, ca = small_limits_broker.port, workspace.paths.root_cert
    sessions = [RawClient(port, ca, claim) for _ in range(3)]
    try:
        answers = []
        for index, client in enumerate(sessions):
            client.send(mq.connect(f"enroll:request-{index:04d}"))
            answers.append(client.connack())
        assert answers == [(0, 0), (0, 0), (0, 3)], "the third: server unavailable"
        assert (
            small_limits_broker.metric(
                "mtls_connection_attempts_total", 'outcome="too_many_sessions"'
            )
            == 1
        )
        sessions[0].send(mq.DISCONNECT)
        assert sessions[0].closed_within(2)
        for _ in range(50):  # the broker finishes the teardown right after the close
            again = RawClient(port, ca, claim)
            sessions.append(again)
            again.send(mq.connect("enroll:request-9999"))
            if again.connack() == (0, 0):
                break
        else:
            pytest.fail("a freed claim session was never reusable")
    finally:
        for client in sessions:
            client.close()


def test_a_flood_from_20_devices_is_contained_and_a_paced_device_still_served(
    tmp_path: Path,
) -> None:
    root = tmp_path / "fleet"
    init_workspace(root, config=FleetConfig())
    workspace = Workspace.open(root)
    flooders = provision_devices(workspace, ProvisionSpec(count=20, prefix="flood")).device_ids
    paced = provision_devices(workspace, ProvisionSpec(count=1, prefix="paced")).device_ids[0]
    with ours(workspace) as broker:
        figure = measure_flood(broker, workspace, flooders, paced, seconds=4, paced_messages=20)
        assert broker.process.poll() is None, "the broker survived"
    assert figure.sent_bytes > 0 and figure.refused_flooders == 0
    assert (figure.paced_acked, figure.paced_delivered) == (20, 20)
    assert figure.growth_mb < 100, f"RSS grew {figure.growth_mb:.0f} MiB under the flood"


def test_broker_timing_logging_and_policy_options_through_the_cli(tmp_path: Path) -> None:
    """--handshake-timeout, --log-connections and --revocation-policy, as a user runs them."""
    root = tmp_path / "fleet"
    init_workspace(root, config=FleetConfig(crl_valid_for=dt.timedelta(seconds=3)))
    workspace = Workspace.open(root)
    provision_devices(workspace, ProvisionSpec(count=1, prefix="dev"))
    process = subprocess.Popen(
        fleet_command(
            "broker", "--dir", root, "--port", "0", "--metrics-port", "-1",
            "--handshake-timeout", "1", "--log-connections", "--revocation-policy", "fail-open",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    events: queue.Queue[dict[str, Any]] = queue.Queue()

    def read_events() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            with contextlib.suppress(ValueError):
                events.put(json.loads(line))

    def next_event(name: str) -> dict[str, Any]:
        while True:
            event = events.get(timeout=15)
            if event.get("event") == name:
                return event

    threading.Thread(target=read_events, daemon=True).start()
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline().rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""  # --handshake-timeout 1, not the default 10
            assert time.monotonic() - started < 5
        assert next_event("rejected")["reason"] == "handshake_timeout"
        assert "fail-open" in next_event("crl_stale")["detail"]  # the CRL lived 3 s
        client = RawClient(
            port, workspace.paths.root_cert, device_credentials(workspace, "dev-00001")
        )
        client.send(mq.connect("dev-00001"))
        assert client.connack() == (0, 0), "fail-open admits while the CRL is stale"
        assert next_event("admitted_stale_crl")["device"] == "dev-00001"
        assert next_event("connected")["device"] == "dev-00001"  # --log-connections
        client.send(mq.DISCONNECT)
        assert next_event("disconnected")["device"] == "dev-00001"
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)

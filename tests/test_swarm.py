"""The swarm engine and `fleet swarm`: real devices in shard processes, against our broker and Mosquitto."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from rich.console import Console

from broker import BrokerSettings
from device.report import progress_table, summary_table
from device.swarm import SwarmConfig, run_swarm, split
from fleet import ProvisionSpec, Workspace, provision_devices
from fleet.kernel.tls import spki_pin
from tests.broker_support import BrokerThread, free_port, settings_for_tests
from tests.conftest import fleet_command, require_tool


@pytest.fixture(scope="module")
def fleet_200(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    from fleet import FleetConfig, init_workspace

    root = tmp_path_factory.mktemp("swarm") / "fleet"
    init_workspace(root, config=FleetConfig())
    workspace = Workspace.open(root)
    provision_devices(workspace, ProvisionSpec(count=200, prefix="sim"))
    return workspace


def _config(ws: Workspace, port: int, count: int = 200, **overrides: object) -> SwarmConfig:
    ids = tuple(r.device_id for r in ws.registry.devices())[:count]
    options: dict[str, object] = {
        "workspace": ws.paths.root,
        "device_ids": ids,
        "port": port,
        "ramp_per_second": 400.0,
        "publish_every": 1.0,
        "duration": 4.0,
    }
    options.update(overrides)
    return SwarmConfig(**options)  # type: ignore[arg-type]


@pytest.fixture
def our_broker(fleet_200: Workspace) -> Iterator[BrokerThread]:
    broker = BrokerThread(
        BrokerSettings(workspace=fleet_200.paths.root, port=0, metrics_port=None, event_log=False)
    )
    yield broker
    broker.stop()


def test_split_deals_devices_round_robin() -> None:
    assert split(["a", "b", "c", "d", "e"], 2) == [("a", "c", "e"), ("b", "d")]
    assert split(["a"], 4) == [("a",)]


def test_200_devices_over_two_processes_against_our_broker(
    fleet_200: Workspace, our_broker: BrokerThread
) -> None:
    stats = run_swarm(_config(fleet_200, our_broker.port), processes=2)
    summary = stats.summary()
    assert summary["outcomes"] == {"connected": 200}
    assert summary["connected_at_deadline"] == 200
    assert summary["messages"]["sent"] >= 200 and summary["messages"]["lost"] == 0
    latency = summary["connect_latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert our_broker.outcome_count("ok") == 200


def test_200_devices_against_a_real_mosquitto(fleet_200: Workspace, tmp_path: Path) -> None:
    mosquitto = require_tool("mosquitto")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    subprocess.run(
        fleet_command("broker", "--dir", fleet_200.paths.root, "--port", str(port), "--emit-mosquitto-conf", conf),
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server = subprocess.Popen(
        [mosquitto, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if "running" in line:
                break
        stats = run_swarm(_config(fleet_200, port), processes=2)
    finally:
        server.terminate()
        server.wait(10)
    summary = stats.summary()
    assert summary["outcomes"] == {"connected": 200}
    assert summary["messages"]["lost"] == 0


def test_faults_become_per_device_outcomes(
    fleet_200: Workspace, our_broker: BrokerThread, tmp_path: Path
) -> None:
    # a copy of the workspace where two devices have broken credentials
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(fleet_200.paths.root, broken)
    (broken / "devices" / "sim-00001" / "key.pem").unlink()
    shutil.copy(
        broken / "devices" / "sim-00003" / "key.pem", broken / "devices" / "sim-00002" / "key.pem"
    )
    config = _config(fleet_200, our_broker.port, count=5, duration=2.0)
    from dataclasses import replace

    stats = run_swarm(replace(config, workspace=broken), processes=1)
    summary = stats.summary()
    assert summary["outcomes"] == {"connected": 3, "credentials_error": 2}
    assert summary["failure_details"] == {
        "credentials_error: missing_file": 1,
        "credentials_error: key_mismatch": 1,
    }
    examples = summary["failure_examples"]  # each kind in words, naming a device at fault
    assert examples["credentials_error: missing_file"].startswith("sim-00001: missing ")
    assert examples["credentials_error: key_mismatch"].startswith("sim-00002: ")
    assert "the key does not match the certificate" in examples["credentials_error: key_mismatch"]


def test_a_target_that_is_not_listening(fleet_200: Workspace) -> None:
    stats = run_swarm(_config(fleet_200, free_port(), count=10, duration=1.5), processes=1)
    summary = stats.summary()
    outcomes = summary["outcomes"]
    assert set(outcomes) == {"network_error"} and outcomes["network_error"] >= 10
    # nothing connected: no latency to report, said plainly (not "p50 nan ms", not JSON NaN)
    assert summary["connect_latency_ms"] == {"p50": None, "p90": None, "p99": None, "max": None}
    json.dumps(summary, allow_nan=False)
    console = Console(width=100, record=True)
    console.print(summary_table(stats), progress_table(stats, title="swarm"))
    shown = console.export_text()
    assert "nan" not in shown
    assert re.search(r"connect latency \(TCP\+TLS\+CONNACK\)[\s│]+none connected", shown), shown


def test_fleet_swarm_command_with_the_embedded_broker(fleet_200: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    result = subprocess.run(
        fleet_command(
            "swarm", "--dir", fleet_200.paths.root, "--devices", "50", "--ramp", "200/s",
            "--publish-every", "1s", "--duration", "3s", "--processes", "1", "--quiet", "--json", out,
            "--groups", "X25519MLKEM768,X25519",
        ),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "swarm summary" in result.stdout
    summary = json.loads(out.read_text())
    assert summary["outcomes"] == {"connected": 50}
    assert summary["messages"]["lost"] == 0
    # every device offered the hybrid group first, and the broker (OpenSSL 4.0) took it
    assert summary["negotiated"] == {"X25519MLKEM768 · ecdsa_secp256r1_sha256": 50}


def test_mqtt5_devices_are_told_plainly_by_a_3_1_1_broker(
    fleet_200: Workspace, our_broker: BrokerThread, tmp_path: Path
) -> None:
    """--mqtt 5 reaches the wire: our broker answers each MQTT 5 CONNECT with CONNACK 1."""
    out = tmp_path / "summary.json"
    result = subprocess.run(
        fleet_command(
            "swarm", "--dir", fleet_200.paths.root, "--devices", "5", "--duration", "2s",
            "--mqtt", "5", "--target", f"mqtts://127.0.0.1:{our_broker.port}",
            "--processes", "1", "--quiet", "--json", out,
        ),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert set(summary["outcomes"]) == {"connack_refused"}
    assert set(summary["failure_details"]) == {"connack_refused: unsupported_protocol_version"}


def _swarm_cli(workspace: Workspace, port: int, out: Path, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        fleet_command(
            "swarm", "--dir", workspace.paths.root, "--devices", "5", "--duration", "2s",
            "--publish-every", "0.5s", "--target", f"mqtts://127.0.0.1:{port}",
            "--processes", "1", "--quiet", "--json", out, *args,
        ),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary


def test_server_name_is_the_name_the_broker_certificate_must_carry(
    fleet_200: Workspace, our_broker: BrokerThread, tmp_path: Path
) -> None:
    out = tmp_path / "summary.json"
    right = _swarm_cli(fleet_200, our_broker.port, out, "--server-name", "localhost")
    assert right["outcomes"] == {"connected": 5}
    wrong = _swarm_cli(fleet_200, our_broker.port, out, "--server-name", "broker.example")
    assert wrong["failure_details"] == {"broker_untrusted: hostname_mismatch": wrong["attempts"]}


def _openssl_pin(cert: Path) -> str:
    """The broker key's pin as curl's documentation computes it, with openssl alone."""
    openssl = require_tool("openssl")
    pipeline = (
        f"{openssl} x509 -in {cert} -pubkey -noout | {openssl} pkey -pubin -outform der"
        f" | {openssl} dgst -sha256 -binary | base64"
    )
    digest = subprocess.run(
        ["sh", "-c", pipeline], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    return f"sha256/{digest}"


@pytest.mark.slow
def test_pinned_devices_refuse_a_valid_broker_certificate_for_another_key(
    fleet_200: Workspace, our_broker: BrokerThread, tmp_path: Path
) -> None:
    pin = _openssl_pin(fleet_200.paths.server_cert)
    assert pin == spki_pin(
        x509.load_pem_x509_certificate(fleet_200.paths.server_cert.read_bytes()).public_bytes(
            Encoding.DER
        )
    )  # ours is the standard one
    out = tmp_path / "summary.json"
    right = _swarm_cli(fleet_200, our_broker.port, out, "--pin", pin)
    assert right["outcomes"] == {"connected": 5}
    other = "sha256/" + "A" * 43 + "="
    wrong = _swarm_cli(fleet_200, our_broker.port, out, "--pin", other)
    assert wrong["failure_details"] == {"broker_untrusted: pin_mismatch": wrong["attempts"]}
    either = _swarm_cli(fleet_200, our_broker.port, out, "--pin", other, "--pin", pin)
    assert either["outcomes"] == {"connected": 5}  # any one of the pins will do
    bad = subprocess.run(
        fleet_command("swarm", "--dir", fleet_200.paths.root, "--pin", "md5/abc"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "--pin: invalid pin 'md5/abc'" in bad.stderr


@pytest.mark.slow
def test_payload_size_reaches_the_wire(fleet_200: Workspace, tmp_path: Path) -> None:
    """A broker that closes links for packets over 1 KiB: 64-byte telemetry passes, 2 KiB
    telemetry gets each session closed at its first publication."""
    broker = BrokerThread(settings_for_tests(fleet_200, max_packet_bytes=1024))
    out = tmp_path / "summary.json"
    try:
        small = _swarm_cli(fleet_200, broker.port, out, "--payload-size", "64")
        large = _swarm_cli(fleet_200, broker.port, out, "--payload-size", "2048")
        closed = broker.wait_for_event(
            lambda e: e["event"] == "session_closed" and e.get("reason") == "protocol_error"
        )
    finally:
        broker.stop()
    assert small["messages"]["lost"] == 0 and small["messages"]["acknowledged"] > 0
    assert large["messages"]["acknowledged"] == 0  # every one was too large to be taken
    size = int(str(closed["detail"]).split("packet of ")[1].split(" bytes")[0])
    assert size > 2048 and str(closed["detail"]).endswith("exceeds the 1024-byte limit")


@pytest.mark.slow
def test_a_swarm_of_short_lived_certificates_renews_itself(
    workspace: Workspace, tmp_path: Path
) -> None:
    provision_devices(
        workspace, ProvisionSpec(count=20, prefix="brief", valid_for=dt.timedelta(seconds=8))
    )
    out = tmp_path / "summary.json"
    result = subprocess.run(
        fleet_command(
            "swarm", "--dir", workspace.paths.root, "--devices", "20", "--publish-every", "0.5s",
            "--duration", "11s", "--processes", "2", "--renew-at", "0.5", "--quiet", "--json", out,
        ),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert summary["renewals"]["done"] >= 20 and summary["renewals"]["failed"] == {}
    assert set(summary["outcomes"]) == {"connected"}  # renewals reconnect; nothing refused
    assert summary["outcomes"]["connected"] >= 40
    assert summary["messages"]["lost"] == 0
    # Each device moves to its new certificate every ~4 s: at the deadline a few may be
    # between that DISCONNECT and the next CONNECT (a planned reconnect, never a refusal; 4 of
    # 20 once on a loaded machine).
    assert summary["connected_at_deadline"] >= 15
    assert "renewals over MQTT" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "5000"], "only 200 active devices"),
        (["--ramp", "fast"], "invalid --ramp 'fast'"),
        (["--target", "http://x"], "invalid --target 'http://x'"),
        (["--source-ips", "10.0.0.1"], "must be loopback addresses"),
        (["--processes", "zero"], "invalid --processes 'zero'"),
        (["--renew-at", "2/3"], "invalid --renew-at '2/3'"),
        (["--mqtt", "5"], "--mqtt 5 needs --target: the embedded broker speaks MQTT 3.1.1 only"),
    ],
)
def test_bad_swarm_options(fleet_200: Workspace, args: list[str], message: str) -> None:
    result = subprocess.run(
        fleet_command("swarm", "--dir", fleet_200.paths.root, *args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_source_addresses_and_tls_key_log(
    fleet_200: Workspace, our_broker: BrokerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keylog = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))  # inherited by the shard process
    config = _config(
        fleet_200, our_broker.port, count=6, duration=2.0, source_ips=("127.0.0.2", "127.0.0.3")
    )
    peers: dict[str, str] = {}

    def remember(stats: object) -> None:
        peers.update(our_broker.broker.session_peers())

    stats = run_swarm(config, processes=1, on_progress=remember)
    assert stats.summary()["outcomes"] == {"connected": 6}
    assert {address.rsplit(":", 1)[0] for address in peers.values()} == {"127.0.0.2", "127.0.0.3"}
    secrets = keylog.read_text()
    assert secrets.count("CLIENT_HANDSHAKE_TRAFFIC_SECRET") + secrets.count("CLIENT_RANDOM") >= 6


def test_a_broker_that_goes_away_mid_run(fleet_200: Workspace) -> None:
    import threading

    broker = BrokerThread(
        BrokerSettings(workspace=fleet_200.paths.root, port=0, metrics_port=None, event_log=False)
    )
    stopped = threading.Event()

    def stop_broker_once_connected(stats: object) -> None:
        if not stopped.is_set() and len(broker.broker.connected_devices) == 20:
            stopped.set()
            threading.Thread(target=broker.stop).start()

    stats = run_swarm(
        _config(fleet_200, broker.port, count=20, duration=4.0),
        processes=1,
        on_progress=stop_broker_once_connected,
    )
    summary = stats.summary()
    assert stopped.is_set()
    assert summary["outcomes"]["connected"] == 20
    assert summary["outcomes"].get("network_error", 0) >= 1, summary  # reconnects find nobody
    assert stats.disconnects >= 20


def test_ctrl_c_stops_the_swarm_and_still_prints_the_summary(
    fleet_200: Workspace, tmp_path: Path
) -> None:
    import signal

    out = tmp_path / "summary.json"
    process = subprocess.Popen(
        fleet_command(
            "swarm", "--dir", fleet_200.paths.root, "--devices", "20", "--duration", "5m",
            "--publish-every", "1s", "--processes", "1", "--quiet", "--json", out,
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("swarm:"):
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stdout and "swarm summary" in stdout
    assert json.loads(out.read_text())["interrupted"] is True

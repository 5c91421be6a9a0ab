"""Post-quantum fleets: ML-DSA and Ed25519 keys in every role, key-exchange groups chosen per
broker and per device, what each handshake agreed on recorded on both ends, and a legacy peer
(Mosquitto on OpenSSL 3.0) refusing with a reason that says why."""

from __future__ import annotations

import asyncio
import functools
import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509 import ocsp
from hypothesis import given
from hypothesis import strategies as st

from device import ConnectAttempt, ConnectOutcome, Device, DeviceSettings, PahoDriver
from fleet import (
    FleetConfig,
    KeyType,
    ProvisionSpec,
    Workspace,
    generate_private_key,
    init_workspace,
    provision_devices,
    revoke_device,
)
from fleet.controlplane.ocsp import OcspResponder
from fleet.kernel.errors import CertificateError, UsageError
from fleet.kernel.handshake_trace import _empty_certificate_list, _signature_scheme
from fleet.kernel.keys import key_type_of, sign_bytes, signature_is_valid
from fleet.kernel.tls import KNOWN_GROUPS, canonical_group, parse_groups
from fleet.store.bundles import export_pkcs12
from tests.broker_support import BrokerThread, running_mosquitto, settings_for_tests
from tests.conftest import fleet_command, openssl

_PQ_KEYS = (KeyType.ED25519, KeyType.ML_DSA_44, KeyType.ML_DSA_65, KeyType.ML_DSA_87)


# -- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(KeyType))
def test_every_key_type_signs_and_is_recognised(key_type: KeyType) -> None:
    key = generate_private_key(key_type)
    assert key_type_of(key) is key_type and key_type_of(key.public_key()) is key_type
    signature = sign_bytes(key, b"renew dev-00001")
    assert signature_is_valid(key.public_key(), signature, b"renew dev-00001")
    assert not signature_is_valid(key.public_key(), signature, b"renew dev-00002")
    other = generate_private_key(
        KeyType.ML_DSA_44 if key_type is KeyType.EC_P256 else KeyType.EC_P256
    )
    assert not signature_is_valid(other.public_key(), signature, b"renew dev-00001")


def test_an_ml_dsa_device_cannot_be_bundled_as_pkcs12_and_is_told_what_to_do(
    tmp_path: Path,
) -> None:
    workspace = init_workspace(tmp_path / "fleet", config=FleetConfig())
    provision_devices(workspace, ProvisionSpec(count=1, prefix="pq", key_type=KeyType.ML_DSA_65))
    with pytest.raises(CertificateError, match="PKCS#12 cannot carry a ml-dsa-65 key"):
        export_pkcs12(workspace, "pq-00001", tmp_path / "pq.p12")
    assert not (tmp_path / "pq.p12").exists()


def _run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fleet_command(*args), capture_output=True, text=True, timeout=timeout)


def test_fleet_init_makes_all_post_quantum_chains_and_provision_any_key_type(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "fleet"
    made = _run(
        "init", "--dir", directory, "--key-type", "ml-dsa-44", "--ca-key-type", "ml-dsa-87",
        "--broker-key-type", "ml-dsa-65",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    workspace = Workspace.open(directory)
    config = workspace.config
    assert (config.key_type, config.ca_key_type, config.broker_key_type) == (
        KeyType.ML_DSA_44,
        KeyType.ML_DSA_87,
        KeyType.ML_DSA_65,
    )
    root = x509.load_pem_x509_certificate(workspace.paths.root_cert.read_bytes())
    broker = x509.load_pem_x509_certificate(workspace.paths.server_cert.read_bytes())
    assert root.signature_algorithm_oid._name == "ML-DSA-87"
    assert isinstance(broker.public_key(), mldsa.MLDSA65PublicKey)
    assert broker.signature_algorithm_oid._name == "ML-DSA-87"  # signed by the issuing CA
    for secret in (
        workspace.paths.root_key,
        workspace.paths.issuing_key,
        workspace.paths.server_key,
    ):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    for key_type in ("ed25519", "ml-dsa-65", ""):
        options = ["--key-type", key_type] if key_type else []
        prefix = key_type or "default"
        done = _run("provision", "--dir", directory, "--count", "2", "--prefix", prefix, *options)
        assert done.returncode == 0, done.stderr
        cert = x509.load_pem_x509_certificate(
            workspace.paths.device_cert(f"{prefix}-00001").read_bytes()
        )
        assert key_type_of(cert.public_key()).value == (key_type or "ml-dsa-44")
        assert cert.signature_algorithm_oid._name == "ML-DSA-87"
        record = workspace.registry.get(f"{prefix}-00002")
        assert record.key_type == (key_type or "ml-dsa-44")  # the registry and the file agree
    # the CRL of an ML-DSA-87 issuing CA is signed with ML-DSA-87, and a revocation lands in it
    revoked = _run("revoke", "--dir", directory, "ed25519-00001")
    assert revoked.returncode == 0, revoked.stderr
    crl = x509.load_pem_x509_crl(workspace.paths.crl.read_bytes())
    assert crl.is_signature_valid(workspace.ca.issuing_cert.public_key())  # type: ignore[arg-type]
    serial = workspace.registry.get("ed25519-00001").serial
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert (
        crl.get_revoked_certificate_by_serial_number(workspace.registry.get("ed25519-00002").serial)
        is None
    )  # the bystander is not on it


def test_unknown_key_types_and_groups_are_refused_by_name(tmp_path: Path) -> None:
    wrong = _run("init", "--dir", tmp_path / "a", "--ca-key-type", "ml-dsa-66")
    assert wrong.returncode != 0
    assert "unknown key type 'ml-dsa-66'" in wrong.stderr and "ml-dsa-65" in wrong.stderr
    assert not (tmp_path / "a" / "fleet.toml").exists()
    init_workspace(tmp_path / "b", config=FleetConfig())
    bad_group = _run("broker", "--dir", tmp_path / "b", "--port", "0", "--groups", "X25519,kyber")
    assert bad_group.returncode == 2
    assert "unknown key-exchange group 'kyber'" in bad_group.stderr
    for_mosquitto = _run(
        "broker", "--dir", tmp_path / "b", "--groups", "X25519",
        "--emit-mosquitto-conf", tmp_path / "m.conf",
    )  # fmt: skip
    assert for_mosquitto.returncode == 2 and "OPENSSL_CONF" in for_mosquitto.stderr
    assert not (tmp_path / "m.conf").exists()


# -- groups and what a handshake agreed on -------------------------------------------------------


@given(st.text(max_size=120))
def test_any_groups_text_parses_to_known_groups_or_is_refused_with_usage_error(text: str) -> None:
    try:
        groups = parse_groups(text)
    except UsageError as exc:
        assert "group" in str(exc)
        return
    assert 1 <= len(groups) <= 16
    assert len({canonical_group(g) or g.lower() for g in groups}) == len(groups)


def test_every_known_group_is_accepted_under_its_own_name_and_aliases() -> None:
    assert parse_groups(",".join(KNOWN_GROUPS)) == KNOWN_GROUPS
    assert [canonical_group(n) for n in ("P-256", "p-384", "X25519", "x25519mlkem768")] == [
        "secp256r1",
        "secp384r1",
        "x25519",
        "X25519MLKEM768",
    ]
    assert canonical_group("kyber") is None


@given(st.binary(min_size=4, max_size=600), st.sampled_from([0x0303, 0x0304, 0]))
def test_handshake_messages_from_the_wire_never_break_the_tracer(data: bytes, version: int) -> None:
    scheme = _signature_scheme(data)
    assert scheme is None or 0 <= scheme <= 0xFFFF
    assert isinstance(_empty_certificate_list(data, version), bool)


def test_the_tracer_reads_certificate_verify_and_an_empty_certificate() -> None:
    assert _signature_scheme(bytes([15, 0, 0, 4, 0x09, 0x05, 0, 0])) == 0x0905  # mldsa65
    assert _empty_certificate_list(bytes([11, 0, 0, 4, 0, 0, 0, 0]), 0x0304)  # TLS 1.3
    assert not _empty_certificate_list(bytes([11, 0, 0, 9, 0, 0, 0, 5, 0, 0, 2, 1, 1]), 0x0304)


def _device(
    workspace: Workspace, device_id: str, port: int, groups: tuple[str, ...] = ()
) -> Device:
    paths = workspace.paths
    settings = DeviceSettings(
        device_id, paths.device_cert(device_id), paths.device_key(device_id), paths.root_cert,
        port=port, groups=groups, reconnect=False, publish_every=0.2,
    )  # fmt: skip
    return Device(settings, PahoDriver())


async def _attempt(
    workspace: Workspace, device_id: str, port: int, groups: tuple[str, ...] = ()
) -> ConnectAttempt:
    device = _device(workspace, device_id, port, groups)
    try:
        return await device.connect()
    finally:
        await device.close()


@pytest.fixture
def mixed_fleet(tmp_path: Path) -> Workspace:
    """An ECDSA CA with classical, Ed25519 and ML-DSA-65 devices."""
    workspace = init_workspace(tmp_path / "fleet", config=FleetConfig())
    for key_type in (KeyType.EC_P256, KeyType.ED25519, KeyType.ML_DSA_65):
        provision_devices(
            workspace, ProvisionSpec(count=2, prefix=key_type.value, key_type=key_type)
        )
    return workspace


def test_a_hybrid_only_broker_refuses_classical_offers_as_no_shared_group_and_serves_the_rest(
    mixed_fleet: Workspace,
) -> None:
    """Through the CLI, as a user runs it: ``fleet broker --groups X25519MLKEM768``."""
    process = subprocess.Popen(
        fleet_command(
            "broker", "--dir", mixed_fleet.paths.root, "--port", "0", "--metrics-port", "-1",
            "--groups", "X25519MLKEM768", "--log-connections",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on mqtts://"), line
        port = int(line.rsplit(":", 1)[1])

        async def scenario() -> tuple[ConnectAttempt, ConnectAttempt, ConnectAttempt, int]:
            bystander = _device(mixed_fleet, "ml-dsa-65-00001", port, ("X25519MLKEM768",))
            held = await bystander.connect()
            refused = await _attempt(mixed_fleet, "ec-p256-00001", port)  # P-256 only
            classical = await _attempt(mixed_fleet, "ed25519-00001", port, ("X25519", "P-256"))
            bystander.publish_telemetry()
            for _ in range(200):  # the bystander is still served after the refusals
                if bystander.stats.acknowledged:
                    break
                await asyncio.sleep(0.02)
            await bystander.close()
            return held, refused, classical, bystander.stats.acknowledged

        held, refused, classical, acknowledged = asyncio.run(scenario())
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=20)
    assert held.outcome is ConnectOutcome.CONNECTED
    assert (held.group, held.broker_signature) == ("X25519MLKEM768", "ecdsa_secp256r1_sha256")
    assert held.handshake_bytes is not None and held.handshake_bytes > 10_000  # ML-DSA-65 chain
    for attempt in (refused, classical):
        assert (attempt.outcome, attempt.detail) == (
            ConnectOutcome.REJECTED_BY_BROKER,
            "no_shared_group",
        ), attempt
        assert attempt.message is not None and "none of the key-exchange groups" in attempt.message
    assert acknowledged == 1
    events = _events(stderr)
    sessions = [e for e in events if e["event"] == "connected"]
    assert [(e["device"], e["group"], e["signature"]) for e in sessions] == [
        ("ml-dsa-65-00001", "X25519MLKEM768", "mldsa65")
    ]
    refusals = [e["reason"] for e in events if e["event"] == "rejected"]
    assert refusals == ["no_shared_group", "no_shared_group"]


def test_each_device_records_the_group_and_the_broker_records_its_signature(
    mixed_fleet: Workspace,
) -> None:
    broker = BrokerThread(settings_for_tests(mixed_fleet, log_connections=True))
    try:
        offers: list[tuple[str, tuple[str, ...], str, str]] = [
            ("ec-p256-00001", (), "secp256r1", "ecdsa_secp256r1_sha256"),
            ("ed25519-00001", ("X25519MLKEM768", "X25519"), "X25519MLKEM768", "ed25519"),
            ("ml-dsa-65-00001", ("x25519",), "x25519", "mldsa65"),
        ]
        for device_id, groups, group, signature in offers:
            attempt = asyncio.run(_attempt(mixed_fleet, device_id, broker.port, groups))
            assert attempt.outcome is ConnectOutcome.CONNECTED, attempt
            assert (attempt.group, attempt.broker_signature) == (group, "ecdsa_secp256r1_sha256")
            event = broker.wait_for_event(functools.partial(_session_of, device_id))
            assert (event["group"], event["signature"]) == (group, signature)
            counted = broker.broker.metrics.registry.get_sample_value(
                "mtls_handshakes_negotiated_total", {"group": group, "signature": signature}
            )
            assert counted == 1  # the migration's progress on /metrics
    finally:
        broker.stop()


# -- a legacy peer: Mosquitto 2.0 on OpenSSL 3.0 -------------------------------------------------


def test_mosquitto_on_openssl_3_refuses_pq_only_devices_saying_why_and_serves_the_rest(
    mixed_fleet: Workspace, tmp_path: Path
) -> None:
    with running_mosquitto(mixed_fleet.paths.root, tmp_path / "mosquitto.conf") as port:

        async def trials() -> dict[str, ConnectAttempt]:
            ws = mixed_fleet
            bystander = _device(ws, "ec-p256-00002", port)
            held = await bystander.connect()
            results = {
                "held": held,
                "hybrid only": await _attempt(ws, "ec-p256-00001", port, ("X25519MLKEM768",)),
                "ml-dsa": await _attempt(ws, "ml-dsa-65-00001", port),
                "fallback": await _attempt(ws, "ed25519-00001", port, ("X25519MLKEM768", "X25519")),
            }
            bystander.publish_telemetry()
            for _ in range(200):
                if bystander.stats.acknowledged:
                    break
                await asyncio.sleep(0.02)
            results["bystander still served"] = ConnectAttempt(
                "ec-p256-00002",
                ConnectOutcome.CONNECTED
                if bystander.stats.acknowledged
                else ConnectOutcome.TIMEOUT,
            )
            await bystander.close()
            return results

        results = asyncio.run(trials())
    assert results["held"].outcome is ConnectOutcome.CONNECTED
    assert results["held"].group == "secp256r1"
    hybrid, ml_dsa = results["hybrid only"], results["ml-dsa"]
    assert (hybrid.outcome, hybrid.detail) == (ConnectOutcome.REJECTED_BY_BROKER, "no_shared_group")
    assert (ml_dsa.outcome, ml_dsa.detail) == (
        ConnectOutcome.REJECTED_BY_BROKER,
        "no_shared_signature_algorithm",
    )
    assert ml_dsa.message is not None and "ml-dsa-65 key" in ml_dsa.message
    fallback = results["fallback"]
    assert (fallback.outcome, fallback.group) == (ConnectOutcome.CONNECTED, "x25519")
    assert results["bystander still served"].outcome is ConnectOutcome.CONNECTED


def test_openssl_3_cannot_use_a_chain_signed_with_ml_dsa(tmp_path: Path) -> None:
    """What a peer on OpenSSL 3.0 makes of an all-PQ fleet: s_client will not even load a
    device certificate its ML-DSA CA signed (the exact error is kept in the closing note)."""
    workspace = init_workspace(
        tmp_path / "fleet", config=FleetConfig(ca_key_type=KeyType.ML_DSA_65)
    )
    provision_devices(workspace, ProvisionSpec(count=1, prefix="d"))
    broker = BrokerThread(settings_for_tests(workspace))
    try:
        paths = workspace.paths
        result = openssl(
            "s_client", "-connect", f"127.0.0.1:{broker.port}", "-CAfile", str(paths.root_cert),
            "-cert", str(paths.device_cert("d-00001")), "-key", str(paths.device_key("d-00001")),
            check=False,
        )  # fmt: skip
    finally:
        broker.stop()
    version = openssl("version").stdout
    if not version.startswith("OpenSSL 3.0"):
        pytest.skip(f"this checks OpenSSL 3.0's refusal; the openssl here is {version.strip()}")
    assert result.returncode != 0
    assert "ca md too weak" in result.stderr


def _session_of(device_id: str, event: dict[str, Any]) -> bool:
    return bool(event["event"] == "connected" and event.get("device") == device_id)


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(text) for text in stderr.splitlines() if text.startswith("{")]


def test_an_ml_dsa_ca_answers_ocsp_signed_with_ml_dsa(tmp_path: Path) -> None:
    workspace = init_workspace(
        tmp_path / "fleet", config=FleetConfig(ca_key_type=KeyType.ML_DSA_65)
    )
    ids = provision_devices(workspace, ProvisionSpec(count=2, prefix="d")).device_ids
    revoke_device(workspace, ids[0])
    responder = OcspResponder(workspace.registry, [workspace.ca])
    issuer = workspace.ca.issuing_cert
    for device_id, status in ((ids[0], "revoked"), (ids[1], "good")):
        cert = x509.load_pem_x509_certificate(workspace.paths.device_cert(device_id).read_bytes())
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
        answer = responder.answer(request.public_bytes(serialization.Encoding.DER))
        assert answer.status == status
        response = ocsp.load_der_ocsp_response(answer.der)
        assert response.signature_algorithm_oid._name == "ML-DSA-65"
        assert signature_is_valid(
            issuer.public_key(), response.signature, response.tbs_response_bytes
        )

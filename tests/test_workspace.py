"""fleet init: the documented layout, a CA openssl accepts, secrets 0600, clear errors."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleet import FleetConfig, KeyType, Workspace, WorkspaceError, init_workspace
from tests.conftest import openssl, openssl_verify


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_the_documented_layout(workspace: Workspace) -> None:
    paths = workspace.paths
    for path in (
        paths.config,
        paths.db,
        paths.root_cert,
        paths.root_key,
        paths.issuing_cert,
        paths.issuing_key,
        paths.crl,
        paths.server_cert,
        paths.server_key,
    ):
        assert path.is_file(), path
    assert paths.devices_dir.is_dir()


def test_every_private_key_is_0600(workspace: Workspace) -> None:
    paths = workspace.paths
    for key in (paths.root_key, paths.issuing_key, paths.server_key):
        assert _mode(key) == 0o600, key
    assert _mode(paths.root_cert) == 0o644


def test_intermediate_has_path_length_zero_and_chains_to_root(workspace: Workspace) -> None:
    issuing = x509.load_pem_x509_certificate(workspace.paths.issuing_cert.read_bytes())
    constraints = issuing.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    root = x509.load_pem_x509_certificate(workspace.paths.root_cert.read_bytes())
    issuing.verify_directly_issued_by(root)


def test_openssl_verifies_the_broker_chain(workspace: Workspace) -> None:
    output = openssl_verify(workspace, workspace.paths.server_cert, purpose="sslserver")
    assert output.strip().endswith(": OK")


def test_broker_certificate_names_localhost_loopback_and_extra_hosts(tmp_path: Path) -> None:
    workspace = init_workspace(
        tmp_path / "ws", config=FleetConfig(), hosts=["broker.lan", "10.1.2.3"]
    )
    chain = x509.load_pem_x509_certificates(workspace.paths.server_cert.read_bytes())
    assert len(chain) == 2, "server.crt holds the leaf followed by the intermediate"
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.lan"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    eku = chain[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_initial_crl_is_empty_signed_and_has_next_update(workspace: Workspace) -> None:
    crl = x509.load_pem_x509_crl(workspace.paths.crl.read_bytes())
    issuing = x509.load_pem_x509_certificate(workspace.paths.issuing_cert.read_bytes())
    assert len(list(crl)) == 0
    assert crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc
    text = openssl("crl", "-in", str(workspace.paths.crl), "-noout", "-text").stdout
    assert "No Revoked Certificates" in text


@pytest.mark.parametrize("key_type", list(KeyType))
def test_every_key_type_builds_a_working_ca(tmp_path: Path, key_type: KeyType) -> None:
    workspace = init_workspace(tmp_path / "ws", config=FleetConfig(key_type=key_type))
    cert = x509.load_pem_x509_certificates(workspace.paths.server_cert.read_bytes())[0]
    assert type(cert.public_key()).__name__.lower().startswith(key_type.value[:2])
    assert Workspace.open(workspace.paths.root).config.key_type is key_type


def test_init_refuses_an_existing_workspace(workspace: Workspace) -> None:
    with pytest.raises(WorkspaceError, match="already holds a fleet workspace"):
        init_workspace(workspace.paths.root, config=FleetConfig())


def test_opening_a_missing_workspace_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match=r"no fleet workspace here; run 'fleet init --dir"):
        Workspace.open(tmp_path / "nowhere")


def test_opening_an_interrupted_init_says_so(tmp_path: Path) -> None:
    (tmp_path / "half" / "ca").mkdir(parents=True)
    with pytest.raises(WorkspaceError, match="incomplete workspace"):
        Workspace.open(tmp_path / "half")


def test_a_bad_settings_file_names_file_and_field(workspace: Workspace) -> None:
    workspace.paths.config.write_text(
        '[fleet]\ntrust_domain = "ok.example"\ncrl_valid_for = "soon"\n'
    )
    with pytest.raises(
        WorkspaceError, match=r"fleet\.toml: field fleet\.crl_valid_for: invalid duration 'soon'"
    ):
        Workspace.open(workspace.paths.root)
    workspace.paths.config.write_text('[fleet]\ntrust_domian = "typo"\n')
    with pytest.raises(WorkspaceError, match=r"unknown field fleet\.trust_domian"):
        Workspace.open(workspace.paths.root)

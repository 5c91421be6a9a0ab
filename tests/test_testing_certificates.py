"""fleet.store.testing makes the certificates the fleet never issues; each is refused for the
reason it was made for by openssl (a verifier nobody here wrote), and its key is kept 0600."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from fleet import Workspace
from fleet.store.ca import CertificateAuthority
from fleet.store.testing import (
    CLIENT_AUTH,
    DeviceFiles,
    copy_identities,
    expired_intermediate,
    install_broker_certificate,
    issue_devices,
    rogue_authority,
)
from tests.conftest import require_tool

_NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _verify(workspace: Workspace, chain: Path, *, purpose: str = "sslclient") -> str:
    """``openssl verify`` of a chain file's leaf, trusting the fleet's root alone."""
    leaf, *rest = x509.load_pem_x509_certificates(chain.read_bytes())
    leaf_file, untrusted = chain.with_suffix(".leaf"), chain.with_suffix(".untrusted")
    leaf_file.write_bytes(leaf.public_bytes(Encoding.PEM))
    untrusted.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in rest))
    result = subprocess.run(
        [require_tool("openssl"), "verify", "-purpose", purpose, "-CAfile",
         str(workspace.paths.root_cert), "-untrusted", str(untrusted), str(leaf_file)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return result.stdout + result.stderr


def test_each_off_fleet_certificate_fails_for_its_own_reason(
    workspace: Workspace, tmp_path: Path
) -> None:
    def issue(
        ca: CertificateAuthority, device_id: str, eku: tuple[ObjectIdentifier, ...] = CLIENT_AUTH
    ) -> DeviceFiles:
        (made,) = issue_devices(
            workspace,
            ca,
            tmp_path / device_id,
            [device_id],
            not_before=_NOW - dt.timedelta(days=1),
            not_after=_NOW + dt.timedelta(days=1),
            extended_key_usage=eku,
        )
        return made

    fleet_made = issue(workspace.ca, "ok-1")
    assert _verify(workspace, fleet_made.cert).strip().endswith(": OK")  # the control

    rogue = issue(rogue_authority(workspace), "d-1")
    assert "error 20 at 1 depth" in _verify(workspace, rogue.cert)  # the intermediate: unknown
    leaf = x509.load_pem_x509_certificate(rogue.cert.read_bytes())
    real_issuer = workspace.ca.issuing_cert.subject
    assert leaf.issuer == real_issuer  # same names as the fleet's: only the keys differ

    old = expired_intermediate(workspace)
    stale = issue(old, "d-2")
    assert "error 10 at 1 depth" in _verify(workspace, stale.cert)  # the intermediate expired

    server_eku = issue(workspace.ca, "d-3", (ExtendedKeyUsageOID.SERVER_AUTH,))
    assert "error 26 at 0 depth" in _verify(workspace, server_eku.cert)  # purpose

    for made in (fleet_made, rogue, stale, server_eku):
        assert made.key.stat().st_mode & 0o777 == 0o600
    (copy,) = copy_identities(tmp_path / "thief", [fleet_made])
    assert copy.key.read_bytes() == fleet_made.key.read_bytes()
    assert copy.key.stat().st_mode & 0o777 == 0o600


def test_broker_certificates_a_strict_device_refuses(workspace: Workspace) -> None:
    paths = workspace.paths
    install_broker_certificate(workspace, hosts=("broker.elsewhere.invalid",))
    wrong_name = _verify(workspace, paths.server_cert, purpose="sslserver")
    assert wrong_name.strip().endswith(": OK")  # a valid chain: only the name is wrong
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.elsewhere.invalid"]

    install_broker_certificate(
        workspace, not_before=_NOW - dt.timedelta(days=30), not_after=_NOW - dt.timedelta(days=1)
    )
    assert "error 10 at 0 depth" in _verify(workspace, paths.server_cert, purpose="sslserver")

    install_broker_certificate(workspace, ca=rogue_authority(workspace))
    assert "unable to get local issuer" in _verify(
        workspace, paths.server_cert, purpose="sslserver"
    )
    assert paths.server_key.stat().st_mode & 0o777 == 0o600

    key_before = paths.server_key.read_bytes()
    install_broker_certificate(workspace, same_key=True)
    assert paths.server_key.read_bytes() == key_before
    assert _verify(workspace, paths.server_cert, purpose="sslserver").strip().endswith(": OK")

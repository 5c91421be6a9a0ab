"""The admin API: mutual TLS with the admin certificate, the CLI's --server, clear 4xx errors."""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import Result

from fleet import ProvisionSpec, Workspace, provision_devices
from fleet.controlplane.admin_api import ROUTES, _status_of
from fleet.controlplane.admin_client import AdminApiError, AdminClient
from fleet.kernel.errors import (
    FleetError,
    NameTakenError,
    RegistryError,
    UnknownClaimError,
    UsageError,
)


def _raw(url: str, context: ssl.SSLContext, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _context(
    workspace: Workspace, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(workspace.paths.root_cert))
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def test_the_cli_drives_a_remote_control_plane(
    workspace: Workspace, api: str, cli: Callable[..., Result], tmp_path: Path
) -> None:
    remote = ["--dir", tmp_path / "nowhere", "--server", api, "--admin", workspace.paths.admin_dir]
    made = cli("provision", "--count", "3", "--prefix", "remote", "--tier", "gold", *remote)
    assert made.exit_code == 0, made.output
    assert "provisioned 3 device(s) (remote-00001 .. remote-00003)" in made.output
    listing = cli("inventory", "--json", *remote)
    assert [d["id"] for d in json.loads(listing.stdout)["devices"]] == [
        "remote-00001", "remote-00002", "remote-00003",
    ]  # fmt: skip
    shown = cli("show", "remote-00002", *remote)
    assert shown.exit_code == 0 and "tier:gold" in shown.stdout and "history" in shown.stdout
    revoked = cli("revoke", "remote-00002", "--reason", "key-compromise", *remote)
    assert revoked.exit_code == 0 and "CRL #" in revoked.stdout
    assert workspace.registry.get("remote-00002").status == "revoked"
    bundle = tmp_path / "batch-1"
    created = cli(
        "claim", "create", "--name", "batch-1", "--max-uses", "5", "--bundle-out", bundle, *remote
    )
    assert created.exit_code == 0, created.output
    assert (bundle / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (bundle / "cert.pem").read_bytes() == (
        workspace.paths.claim_dir("batch-1") / "cert.pem"
    ).read_bytes()
    claims = cli("claim", "list", "--json", *remote)
    assert json.loads(claims.stdout)["claims"][0]["max_uses"] == 5
    assert cli("claim", "revoke", "batch-1", *remote).exit_code == 0
    assert workspace.registry.claim("batch-1").status == "revoked"
    missing = cli("show", "ghost", *remote)
    assert missing.exit_code == 2 and "unknown device 'ghost'" in missing.stderr


def test_bad_requests_get_a_4xx_naming_the_field_and_change_nothing(
    workspace: Workspace, api: str
) -> None:
    provision_devices(workspace, ProvisionSpec(count=1, prefix="x"))
    client = AdminClient(api, workspace.paths.admin_dir)
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/v1/devices", {"count": "three"}, 400, "count"),
        ("/v1/devices", {"count": 2, "colour": "red"}, 400, "colour"),
        ("/v1/devices", {"count": 2, "valid_for": "forever"}, 400, "valid_for"),
        ("/v1/devices", {"csr": "not a csr", "id": "y-1"}, 400, ""),
        ("/v1/devices", {"csr": "x"}, 400, "id"),
        ("/v1/devices/x-00001/revoke", {"reason": "bored"}, 400, "reason"),
        ("/v1/devices/ghost/revoke", {}, 404, ""),
        ("/v1/claims", {"max_uses": 3}, 400, "name"),
    ]
    context = _context(workspace, workspace.paths.admin_cert, workspace.paths.admin_key)
    for path, body, status, field in cases:
        code, answer = _raw(api + path, context, "POST", body)
        assert code == status, (path, body, answer)
        assert answer.get("field", "") == field, (path, body, answer)
        assert answer["error"]
        with pytest.raises(AdminApiError) as raised:
            client.post(path, body)
        assert raised.value.status == status
    assert [r.device_id for r in workspace.registry.devices()] == ["x-00001"]
    assert workspace.registry.get("x-00001").status == "active"
    assert workspace.registry.claims() == []
    code, answer = _raw(api + "/v1/claims", context, "POST", {"name": "dup"})
    assert code == 200
    code, answer = _raw(api + "/v1/claims", context, "POST", {"name": "dup"})
    assert (code, answer["field"]) == (409, "name")
    code, answer = _raw(api + "/v1/claims/ghost/revoke", context, "POST", {})
    assert code == 404 and "unknown claim 'ghost'" in answer["error"]
    csr = _csr_pem()
    code, answer = _raw(api + "/v1/devices", context, "POST", {"csr": csr, "id": "x-00001"})
    assert (code, answer["field"]) == (409, "id")
    assert [r.device_id for r in workspace.registry.devices()] == ["x-00001"]


def test_the_status_comes_from_the_exception_type_not_its_words() -> None:
    """A message that happens to say "already exists" or "unknown claim" decides nothing."""
    assert _status_of(UsageError("x already exists")) == (HTTPStatus.BAD_REQUEST, None)
    assert _status_of(RegistryError("unknown claim 'a'")) == (HTTPStatus.CONFLICT, None)
    assert _status_of(UnknownClaimError("a")) == (HTTPStatus.NOT_FOUND, None)
    assert _status_of(NameTakenError("taken", field="id")) == (HTTPStatus.CONFLICT, "id")
    assert _status_of(FleetError("boom")) == (HTTPStatus.INTERNAL_SERVER_ERROR, None)


def test_only_an_admin_certificate_gets_in(workspace: Workspace, api: str) -> None:
    provision_devices(workspace, ProvisionSpec(count=1, prefix="d"))
    device = _context(
        workspace, workspace.paths.device_cert("d-00001"), workspace.paths.device_key("d-00001")
    )
    code, answer = _raw(api + "/v1/devices", device)
    assert code == 403 and "admin" in answer["error"]
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _raw(api + "/v1/devices", _context(workspace))  # no certificate: no TLS session


def test_the_openapi_schema_describes_every_route(workspace: Workspace, api: str) -> None:
    context = _context(workspace, workspace.paths.admin_cert, workspace.paths.admin_key)
    code, schema = _raw(api + "/openapi.json", context)
    assert code == 200 and schema["openapi"].startswith("3.1")
    described = {
        (method.upper(), path) for path, item in schema["paths"].items() for method in item
    }
    for method, pattern, _ in ROUTES:
        path = re.sub(r"\(\?P<id>\[\^/\]\+\)", "{id}", pattern.pattern.strip("^$"))
        assert (method, path) in described, (method, path)
    assert len(described) == len(ROUTES) + 1  # and /openapi.json itself

"""The control plane's admin API: JSON over HTTPS with mutual TLS, for admin certificates only.

``fleet serve --api-port 8443`` serves it beside the plain-HTTP CRL and OCSP endpoints. The
server presents the broker's certificate (``DIR/broker/server.crt``: localhost, 127.0.0.1 and
every ``fleet init --host``); clients must present a certificate of this fleet with the
*admin* role (``DIR/admin/``): no passwords. Another certificate gets 403; no certificate
ends in the TLS handshake. The schema is served at ``GET /openapi.json``
(:mod:`fleet.controlplane.admin_openapi`).

Every operation is the library call the CLI makes, so it is as atomic as the CLI: a refused
request changes nothing. Errors are ``{"error": ..., "field": ..., "status": ...}`` with 400
(the named field is wrong), 403, 404 (unknown device or claim), 409 (the id or name is taken)
or 500.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import socket
import ssl
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography import x509

from fleet.controlplane.admin_openapi import OPENAPI
from fleet.controlplane.admin_requests import MAX_BODY, ApiError, RequestBody, parse_field
from fleet.kernel.durations import parse_positive_duration
from fleet.kernel.errors import (
    CertificateError,
    FleetError,
    NameTakenError,
    RegistryError,
    UnknownClaimError,
    UnknownDeviceError,
    UsageError,
)
from fleet.kernel.identity import (
    ADMIN,
    ENVIRONMENTS,
    TIERS,
    identity_from_certificate,
)
from fleet.kernel.keys import KeyType
from fleet.kernel.tls import ServerFiles, mtls_server_context
from fleet.store.admins import admin_certificate_problem
from fleet.store.ca import parse_revocation_reason
from fleet.store.claims import ClaimRules, create_claim, revoke_claim
from fleet.store.provisioning import ProvisionSpec, provision_devices, provision_from_csr
from fleet.store.revocation import revoke_device, revoke_superseded
from fleet.store.views import claim_view, device_details, inventory
from fleet.store.workspace import Workspace

log = logging.getLogger("mtls_fleet.admin_api")

MAX_DEVICES_PER_REQUEST = 1000  # larger batches: 'fleet provision' on the control plane's host
_HANDSHAKE_TIMEOUT = 10.0


# -- operations ------------------------------------------------------------------------------


class _Operations:
    """What each route does, on one workspace."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def list_devices(self, query: dict[str, str], body: bytes) -> Any:
        within = query.get("expiring_within")
        return {
            "devices": inventory(
                self.workspace,
                expiring_within=parse_field("expiring_within", parse_positive_duration, within)
                if within
                else None,
                status=query.get("status"),
            )
        }

    def show_device(self, device_id: str, body: bytes) -> Any:
        return device_details(self.workspace, device_id)

    def provision(self, query: dict[str, str], body: bytes) -> Any:
        fields = RequestBody(
            body, ("count", "prefix", "tier", "env", "valid_for", "key_type", "id", "csr")
        )
        tier, env = (
            fields.choice("tier", TIERS, "bronze"),
            fields.choice("env", ENVIRONMENTS, "prod"),
        )
        valid_for = fields.duration("valid_for")
        csr = fields.text("csr")
        if csr is not None:
            device_id = fields.identifier("id")
            cert = provision_from_csr(
                self.workspace,
                csr.encode(),
                device_id=device_id,
                tier=tier,
                env=env,
                valid_for=valid_for,
            )
            chain = self.workspace.ca.chain_pem(cert).decode()
            return {"devices": [device_id], "certificate": chain}
        key_type = fields.text("key_type")
        spec = ProvisionSpec(
            count=fields.integer("count", 1, maximum=MAX_DEVICES_PER_REQUEST),
            prefix=fields.text("prefix", "device") or "device",
            tier=tier,
            env=env,
            valid_for=valid_for,
            key_type=parse_field("key_type", KeyType.parse, key_type) if key_type else None,
        )
        spec.validate()
        result = provision_devices(self.workspace, spec)
        return {"devices": result.device_ids}

    def revoke_device(self, device_id: str, body: bytes) -> Any:
        fields = RequestBody(body, ("reason", "superseded_only"))
        superseded_only = fields.flag("superseded_only")
        reason_text = fields.text("reason") or ("superseded" if superseded_only else "unspecified")
        reason = parse_field("reason", parse_revocation_reason, reason_text)
        revoke = revoke_superseded if superseded_only else revoke_device
        result = revoke(self.workspace, device_id, reason=reason)
        return {
            "id": device_id,
            "revoked_serials": [format(s, "X") for s in result.revoked_serials],
            "crl_number": result.crl_number,
        }

    def list_claims(self, query: dict[str, str], body: bytes) -> Any:
        now = dt.datetime.now(dt.UTC)
        return {"claims": [claim_view(c, now) for c in self.workspace.registry.claims()]}

    def create_claim(self, query: dict[str, str], body: bytes) -> Any:
        fields = RequestBody(
            body,
            ("name", "max_uses", "valid_for", "allow_ids", "tier", "env", "device_valid_for"),
        )
        rules = ClaimRules(
            name=fields.identifier("name"),
            max_uses=fields.integer("max_uses", 1000),
            valid_for=fields.duration("valid_for") or dt.timedelta(days=30),
            allow_ids=fields.text("allow_ids", "*") or "*",
            tier=fields.choice("tier", TIERS, "bronze"),
            env=fields.choice("env", ENVIRONMENTS, "prod"),
            device_valid_for=fields.duration("device_valid_for"),
        )
        claim = create_claim(self.workspace, rules)
        directory = self.workspace.paths.claim_dir(claim.name)
        view = claim_view(claim, dt.datetime.now(dt.UTC))
        view["bundle"] = {  # what the factory flashes on each device of the batch
            "cert.pem": (directory / "cert.pem").read_text(),
            "key.pem": (directory / "key.pem").read_text(),
            "root.crt": (directory / "root.crt").read_text(),
        }
        return view

    def revoke_claim(self, name: str, body: bytes) -> Any:
        RequestBody(body, ())
        self.workspace.registry.claim(name)  # 404 for an unknown claim
        changed = revoke_claim(self.workspace, name)
        return {"name": name, "revoked": changed}


_Route = tuple[str, re.Pattern[str], str]
ROUTES: tuple[_Route, ...] = (
    ("GET", re.compile(r"^/v1/devices$"), "list_devices"),
    ("POST", re.compile(r"^/v1/devices$"), "provision"),
    ("GET", re.compile(r"^/v1/devices/(?P<id>[^/]+)$"), "show_device"),
    ("POST", re.compile(r"^/v1/devices/(?P<id>[^/]+)/revoke$"), "revoke_device"),
    ("GET", re.compile(r"^/v1/claims$"), "list_claims"),
    ("POST", re.compile(r"^/v1/claims$"), "create_claim"),
    ("POST", re.compile(r"^/v1/claims/(?P<id>[^/]+)/revoke$"), "revoke_claim"),
)


def _status_of(exc: FleetError) -> tuple[HTTPStatus, str | None]:
    """The HTTP status and the request field at fault, decided by the exception's type."""
    if isinstance(exc, ApiError):
        return exc.status, exc.field
    if isinstance(exc, UnknownDeviceError | UnknownClaimError):
        return HTTPStatus.NOT_FOUND, None
    if isinstance(exc, NameTakenError):
        return HTTPStatus.CONFLICT, exc.field
    if isinstance(exc, RegistryError):
        return HTTPStatus.CONFLICT, None
    if isinstance(exc, UsageError | CertificateError):
        return HTTPStatus.BAD_REQUEST, None
    return HTTPStatus.INTERNAL_SERVER_ERROR, None


# -- the server ------------------------------------------------------------------------------


class _TlsServer(ThreadingHTTPServer):
    """Each connection's TLS handshake runs in its own thread, not in the accept loop."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(address, handler)
        self.context = context

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        sock.settimeout(_HANDSHAKE_TIMEOUT)
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return tls, address


class AdminApi:
    """Serves the admin API for one workspace until :meth:`stop`."""

    def __init__(self, workspace: Workspace, *, host: str = "127.0.0.1", port: int = 8443) -> None:
        paths = workspace.paths
        context = mtls_server_context(
            ServerFiles(paths.server_cert, paths.server_key, paths.root_cert)
        )
        self.operations = _Operations(workspace)
        self.server = _TlsServer((host, port), _handler(self.operations), context)
        self.host = host
        self.port = int(self.server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="admin-api")
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(10)


def _handler(operations: _Operations) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "mtls-fleet-admin"

        admin: str | None = None
        refusal = "only an admin certificate may use this API"

        def handle(self) -> None:
            """The TLS handshake first (in this connection's thread), then HTTP."""
            tls = self.connection
            assert isinstance(tls, ssl.SSLSocket)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.info("%s: TLS handshake failed (%s)", self.client_address[0], exc)
                return
            tls.settimeout(60)
            self.admin, refusal = _admin_name(tls, operations.workspace)
            if refusal is not None:
                self.refusal = refusal
            super().handle()

        def log_message(self, format: str, *args: object) -> None:
            log.info("%s %s %s", self.admin or "-", self.address_string(), format % args)

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body, indent=1).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def send_error(
            self, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            """http.server's own refusals (an unknown method, a bad request line) as the API's
            JSON error object; an unsupported method is 405, not 501."""
            status = HTTPStatus(code)
            if status is HTTPStatus.NOT_IMPLEMENTED:
                status = HTTPStatus.METHOD_NOT_ALLOWED
                message = f"method {self.command} is not allowed: use GET or POST"
            self.close_connection = True
            self._error(status, message or status.phrase)

        def _error(self, status: HTTPStatus, message: str, field: str | None = None) -> None:
            body: dict[str, Any] = {"error": message, "status": status.value}
            if field is not None:
                body["field"] = field
            self._send(status, body)

        def _dispatch(self, method: str) -> None:
            if self.admin is None:
                self._error(HTTPStatus.FORBIDDEN, self.refusal)
                return
            url = urllib.parse.urlsplit(self.path)
            if method == "GET" and url.path == "/openapi.json":
                self._send(HTTPStatus.OK, OPENAPI)
                return
            length = parse_content_length(self.headers.get("Content-Length"))
            if length is None:
                self._error(HTTPStatus.BAD_REQUEST, "Content-Length must be a decimal number")
                return
            if length > MAX_BODY:
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the body is over 256 KiB")
                return
            body = self.rfile.read(length) if length else b""
            query = dict(urllib.parse.parse_qsl(url.query))
            for route_method, pattern, name in ROUTES:
                match = pattern.fullmatch(url.path)
                if match is None or route_method != method:
                    continue
                operation = getattr(operations, name)
                argument = urllib.parse.unquote(match["id"]) if "id" in match.groupdict() else query
                try:
                    self._send(HTTPStatus.OK, operation(argument, body))
                except FleetError as exc:
                    status, field = _status_of(exc)
                    self._error(status, str(exc), field)
                except Exception as exc:  # a defect: say so, keep serving
                    log.exception("%s %s failed", method, url.path)
                    self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}")
                return
            self._error(HTTPStatus.NOT_FOUND, f"no route {method} {url.path}")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

    return Handler


def parse_content_length(header: str | None) -> int | None:
    """The header's value; None when it is not a short decimal number."""
    text = (header or "0").strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 12 else None


def _admin_name(sock: ssl.SSLSocket, workspace: Workspace) -> tuple[str | None, str | None]:
    """(the admin's name, None) if the peer's verified certificate has the admin role and is a
    recorded, unrevoked admin certificate of a trusted issuer; else (None, why not)."""
    der = sock.getpeercert(binary_form=True)
    if der is None:
        return None, None
    cert = x509.load_der_x509_certificate(der)
    try:
        identity = identity_from_certificate(cert)
    except CertificateError:
        return None, None
    if identity.role != ADMIN:
        return None, None
    problem = admin_certificate_problem(workspace, cert)
    if problem is not None:
        return None, f"admin certificate of {identity.device_id!r} refused: {problem}"
    return identity.device_id, None

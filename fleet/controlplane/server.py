"""``fleet serve``: the control plane's HTTP side. Revocation for any broker.

* ``GET /crl``      the current issuing CA's CRL, DER (``application/pkix-crl``): the CRL
  distribution point that ``fleet init --crl-url`` embeds in every certificate;
* ``GET /crl.pem``  every trusted issuer's CRL, PEM (what ``fleet broker --crl-url`` and
  ``fleet crl sync`` fetch);
* ``POST /ocsp`` and ``GET /ocsp/<base64 request>``  OCSP (RFC 6960) for every issued serial;
* ``GET /metrics``  Prometheus: ``fleet_certificates_expiring{within="1h|1d|7d|30d"}`` (devices
  whose current certificate expires within that window, revoked ones left out) and
  ``fleet_certificates_expired``, for alerting;
* ``GET /healthz``.

It also keeps the CRL fresh: when less than half of its lifetime is left it publishes a new
one, so brokers only go stale when the control plane is down.

Given a broker (``fleet serve --broker mqtts://HOST:PORT``) it also answers enrollment and
renewal requests over MQTT (:mod:`fleet.controlplane.mqtt_service`), counted on ``/metrics`` as
``fleet_enrollments_total{outcome}`` and ``fleet_renewals_total{outcome}``; with
``--api-port`` it serves the admin API (:mod:`fleet.controlplane.admin_api`, HTTPS with mutual TLS).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import threading
import urllib.parse
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet.controlplane.admin_api import AdminApi, parse_content_length
from fleet.controlplane.alert_rules import AlertRules
from fleet.controlplane.alerts import AlertEngine
from fleet.controlplane.dashboard import Dashboard, FleetPage
from fleet.controlplane.event_feed import EventFeed
from fleet.controlplane.fleet_view import FleetView
from fleet.controlplane.mqtt_service import CertificateService
from fleet.controlplane.ocsp import MALFORMED_ANSWER, OcspResponder
from fleet.store.ca import CertificateAuthority
from fleet.store.certificate_requests import CertificateRequests
from fleet.store.revocation import load_crl, publish_crl
from fleet.store.workspace import Workspace, ensure_admin_certificate

log = logging.getLogger("mtls_fleet.control_plane")

_MAX_REQUEST = 64 * 1024
_IDLE_SECONDS = 30


EXPIRY_WINDOWS = {
    "1h": dt.timedelta(hours=1),
    "1d": dt.timedelta(days=1),
    "7d": dt.timedelta(days=7),
    "30d": dt.timedelta(days=30),
}


class _ExpiryCollector(Collector):
    """Counts, at every scrape, the devices whose certificate expires soon (from the registry)."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def collect(self) -> Iterator[Metric]:
        now = dt.datetime.now(dt.UTC)
        horizon = now + max(EXPIRY_WINDOWS.values())
        soon = [
            record
            for record in self.workspace.registry.devices(not_after_before=horizon)
            if record.status != "revoked"
        ]
        expiring = GaugeMetricFamily(
            "fleet_certificates_expiring",
            "Devices whose current certificate expires within the window (revoked ones excluded)",
            labels=["within"],
        )
        for label, window in EXPIRY_WINDOWS.items():
            count = sum(1 for r in soon if now < r.not_after <= now + window)
            expiring.add_metric([label], count)
        yield expiring
        yield GaugeMetricFamily(
            "fleet_certificates_expired",
            "Devices whose current certificate has expired (revoked ones excluded)",
            value=sum(1 for r in soon if r.not_after <= now),
        )


class ControlPlane:
    """Serves CRLs and OCSP for one workspace until :meth:`stop`."""

    def __init__(
        self,
        workspace: Workspace,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        crl_check_every: float = 60.0,
    ) -> None:
        self.workspace = workspace
        self._responder_signature: tuple[object, ...] | None = None
        self._responder: OcspResponder | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._crl_check_every = crl_check_every
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.host = host
        self._threads: list[threading.Thread] = []
        self.metrics = CollectorRegistry()
        self.metrics.register(_ExpiryCollector(workspace))
        self.requests = CertificateRequests(workspace, self.metrics)
        self.service: CertificateService | None = None
        self.api: AdminApi | None = None
        self.view = FleetView(workspace)
        self.events = EventFeed()  # fed by the broker's lifecycle events (with --broker)
        self.alerts: AlertEngine | None = None
        self.dashboard: Dashboard | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.refresh_crl()
        for target in (self.server.serve_forever, self._keep_crl_fresh):
            thread = threading.Thread(target=target, name=target.__name__, daemon=True)
            thread.start()
            self._threads.append(thread)

    def answer_requests(self, host: str, port: int) -> None:
        """Also answer enrollment and renewal requests on the broker at ``host:port``.

        Raises :class:`~fleet.controlplane.mqtt_service.BrokerUnreachable` if it cannot connect.
        """
        service = CertificateService(
            self.workspace,
            self.requests,
            host=host,
            port=port,
            metrics=self.metrics,
            events=self.events,
        )
        service.start()
        self.service = service
        if self.alerts is not None:
            self.alerts.publish = service.publish

    def watch_alerts(self, rules: AlertRules, *, every: float = 5.0) -> None:
        """Evaluate ``rules`` live and deliver what fires (MQTT once answering on a broker)."""
        engine = AlertEngine(rules, self.view, self.events, metrics=self.metrics, every=every)
        if self.service is not None:
            engine.publish = self.service.publish
        engine.start()
        self.alerts = engine

    def serve_dashboard(self, *, port: int) -> None:
        """Also serve the live web dashboard on ``port`` of the same host (OSError if taken)."""
        page = FleetPage(
            self.view,
            self.events if self.service is not None else None,
            alerts=self.alerts.recent if self.alerts is not None else None,
        )
        dashboard = Dashboard(host=self.host, port=port, fleet=page)
        dashboard.start()
        self.dashboard = dashboard

    def serve_admin_api(self, *, port: int) -> None:
        """Also serve the admin API (HTTPS, mutual TLS) on ``port`` of the same host."""
        ensure_admin_certificate(self.workspace)
        api = AdminApi(self.workspace, host=self.host, port=port)
        api.start()
        self.api = api

    def health_problems(self) -> list[str]:
        """What keeps the control plane from doing its job now (empty: healthy)."""
        problems = []
        if self.service is not None:
            problems += self.service.health_problems()
        return problems

    def stop(self) -> None:
        self._stop.set()
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.alerts is not None:
            self.alerts.stop()
        if self.api is not None:
            self.api.stop()
        if self.service is not None:
            self.service.stop()
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(10)

    # -- CRL -----------------------------------------------------------------------------------

    def refresh_crl(self, *, now: dt.datetime | None = None) -> bool:
        """Publish a new CRL when less than half of the current one's lifetime is left."""
        now = now or dt.datetime.now(dt.UTC)
        current = x509.load_pem_x509_crl(self.workspace.paths.crl.read_bytes())
        next_update = current.next_update_utc or now
        lifetime = next_update - current.last_update_utc
        if next_update - now > lifetime / 2:
            return False
        crl = publish_crl(self.workspace, now=now)
        log.info("published a fresh CRL (nextUpdate %s)", crl.next_update_utc)
        return True

    def _keep_crl_fresh(self) -> None:
        while not self._stop.wait(self._crl_check_every):
            try:
                self.refresh_crl()
            except Exception:  # keep serving; the next round tries again
                log.exception("could not refresh the CRL")

    def crl_pem(self) -> bytes:
        return self.workspace.paths.crl.read_bytes()

    def crl_der(self) -> bytes:
        return load_crl(self.workspace).public_bytes(Encoding.DER)

    # -- OCSP ----------------------------------------------------------------------------------

    def responder(self) -> OcspResponder:
        """The responder for the issuers trusted now (reloaded after a CA rotation)."""
        paths = self.workspace.paths
        signature = (
            paths.issuing_cert.stat().st_mtime_ns,
            tuple(p.name for p in paths.previous_issuer_certs()),
        )
        with self._lock:
            if self._responder is None or signature != self._responder_signature:
                fresh = Workspace(paths, self.workspace.config)
                authorities: list[CertificateAuthority] = [fresh.ca, *fresh.previous_authorities()]
                self._responder = OcspResponder(self.workspace.registry, authorities)
                self._responder_signature = signature
            return self._responder


def _handler(plane: ControlPlane) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "mtls-fleet"
        timeout = _IDLE_SECONDS  # an idle or slow client does not keep its thread for ever

        def log_message(self, format: str, *args: object) -> None:
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: HTTPStatus, message: str) -> None:
            body = json.dumps({"error": message, "status": status.value}).encode()
            self._send(status, body, "application/json")

        def _ocsp(self, request: bytes) -> None:
            answer = plane.responder().answer(request)
            self._send(HTTPStatus.OK, answer.der, "application/ocsp-response")

        def _ocsp_malformed(self) -> None:
            """RFC 6960: a request that cannot be read gets malformedRequest, not a drop."""
            self._send(HTTPStatus.OK, MALFORMED_ANSWER.der, "application/ocsp-response")

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path == "/crl":
                self._send(HTTPStatus.OK, plane.crl_der(), "application/pkix-crl")
            elif path == "/crl.pem":
                self._send(HTTPStatus.OK, plane.crl_pem(), "application/x-pem-file")
            elif path.startswith("/ocsp/"):
                encoded = urllib.parse.unquote(path[len("/ocsp/") :])
                try:
                    request = base64.b64decode(encoded, validate=True)
                except binascii.Error:
                    self._error(HTTPStatus.BAD_REQUEST, "the OCSP request is not base64")
                    return
                self._ocsp(request)
            elif path == "/metrics":
                self._send(HTTPStatus.OK, generate_latest(plane.metrics), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                problems = plane.health_problems()
                status = HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK
                body = {"status": "unhealthy" if problems else "ok", "problems": problems}
                self._send(status, json.dumps(body).encode(), "application/json")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such resource {path!r}")

        def do_POST(self) -> None:
            if urllib.parse.urlsplit(self.path).path != "/ocsp":
                self._error(HTTPStatus.NOT_FOUND, f"no such resource {self.path!r}")
                return
            length = parse_content_length(self.headers.get("Content-Length"))
            if length is None:
                self._ocsp_malformed()
                return
            if not 0 < length <= _MAX_REQUEST:
                self._error(
                    HTTPStatus.BAD_REQUEST, "an OCSP request needs a body of at most 64 KiB"
                )
                return
            self._ocsp(self.rfile.read(length))

    return Handler

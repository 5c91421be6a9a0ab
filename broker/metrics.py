"""Prometheus metrics of one broker, in a registry of its own (several brokers per process)."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from broker.outcomes import Outcome


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Counter(
            "mtls_connection_attempts",
            "Connection attempts by outcome (TLS handshake, then MQTT CONNECT).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in Outcome:
            self.connections.labels(outcome.value)  # every outcome shows, even at zero
        self.handshake_seconds = Histogram(
            "mtls_handshake_duration_seconds",
            "Server-side TLS handshake duration, from TCP accept to handshake done or failed.",
            ["result"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.handshakes_negotiated = Counter(
            "mtls_handshakes_negotiated",
            "Completed TLS handshakes by key-exchange group and the scheme the client signed "
            "with (how far a post-quantum migration has come).",
            ["group", "signature"],
            registry=self.registry,
        )
        self.connected = Gauge(
            "mtls_connected_devices",
            "Devices with an authorised MQTT session.",
            registry=self.registry,
        )
        self.sessions_closed = Counter(
            "mtls_sessions_closed_by_broker",
            "Live sessions the broker ended: revoked, expired, takeover, keepalive_timeout, "
            "protocol_error.",
            ["reason"],
            registry=self.registry,
        )
        self.messages_dropped = Counter(
            "mtls_messages_dropped",
            "Messages not delivered because a session's queue was full (see --max-queued-messages).",
            ["reason"],
            registry=self.registry,
        )
        self.acl_denied = Counter(
            "mtls_acl_denied",
            "Publish or subscribe requests refused by topic rights.",
            ["action"],
            registry=self.registry,
        )
        self.crl_next_update = Gauge(
            "mtls_crl_next_update_timestamp_seconds",
            "nextUpdate of the CRL in force.",
            registry=self.registry,
        )
        self.crl_number = Gauge("mtls_crl_number", "CRL number in force.", registry=self.registry)
        self.crl_stale = Gauge(
            "mtls_crl_stale",
            "1 while the CRL in force is past its nextUpdate.",
            registry=self.registry,
        )
        self.subscriptions_revoked = Counter(
            "mtls_subscriptions_revoked_total",
            "Live subscriptions dropped because a new access policy no longer grants them.",
            registry=self.registry,
        )
        self.policy_reloads = Counter(
            "mtls_policy_reloads_total",
            "Access policy files seen changed, by result (installed, refused).",
            ["result"],
            registry=self.registry,
        )
        self.stale_admissions = Counter(
            "mtls_stale_crl_admissions",
            "Handshakes admitted under --revocation-policy fail-open while the CRL was stale.",
            registry=self.registry,
        )
        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on a background thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

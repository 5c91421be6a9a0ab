"""FleetBroker: the accept loop, the admission policy and live revocation, around the MQTT
engine (:mod:`broker.engine`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto

from broker.acl import ADMIN_RIGHTS, claim_rights
from broker.config import BrokerSettings, RevocationPolicy
from broker.connection import PeerConnection
from broker.engine import MqttEngine
from broker.lifecycle import LifecyclePublisher
from broker.metrics import BrokerMetrics
from broker.outcomes import BrokerEvent, Outcome, SessionEnd
from broker.packets import ConnackCode, ConnectRequest
from broker.policy import DEFAULT_POLICY, AccessPolicy, WindowVerdict, load_policy
from broker.policy_reload import PolicyReload
from broker.revocation import LiveRevocation
from broker.tls import BrokerError
from fleet.kernel.handshake_trace import HandshakeTracer
from fleet.kernel.identity import ADMIN, CLAIM, DEVICE, DeviceIdentity
from fleet.kernel.lifecycle import Disconnect
from fleet.kernel.mqtt_api import ADMIN_CLIENT_PREFIX, ENROLL_CLIENT_PREFIX, is_request_id
from fleet.store.crls import (
    CrlState,
)
from fleet.store.workspace import WorkspacePaths

log = logging.getLogger("mtls_fleet.broker")
events_log = logging.getLogger("mtls_fleet.broker.events")

Event = dict[str, Any]


class FleetBroker:
    """An MQTT broker that requires client certificates and enforces revocation live.

    ``await start()`` binds and serves; ``await stop()`` closes everything. ``events`` keeps the
    latest structured events (rejections, forced disconnects, CRL changes) for tools and tests.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.paths = WorkspacePaths(settings.workspace)
        self.metrics = BrokerMetrics()
        self.events: deque[Event] = deque(maxlen=10_000)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.policy = load_policy(settings.policy) if settings.policy else DEFAULT_POLICY
        self._policy_reload: PolicyReload | None = None
        self.revocation = LiveRevocation(
            settings,
            self.paths,
            self.metrics,
            log_event=lambda event, detail: self.log_event(event, None, detail=detail),
            on_installed=self._close_sessions_revoked_by,
        )
        self._connections: set[PeerConnection] = set()
        self._by_serial: dict[int, set[PeerConnection]] = {}
        self._sessions: dict[str, PeerConnection] = {}
        self._issuer_names: dict[x509.Name, x509.Name] = {}
        self._event_listeners: list[Callable[[Event], None]] = []
        self._server: asyncio.Server | None = None
        self.engine = MqttEngine(settings.session_limits, on_drop=self.message_dropped)
        self.lifecycle = LifecyclePublisher(self.engine)
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.revocation.prefer_served_crl()
        try:
            self._server = await loop.create_server(
                lambda: PeerConnection(self),
                self.settings.host,
                self.settings.port,
                backlog=4096,
                reuse_address=True,
            )
        except OSError as exc:
            raise BrokerError(
                f"cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror}"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        self.revocation.begin()
        if self.settings.policy is not None:
            self._policy_reload = PolicyReload(
                self.settings.policy,
                self.settings.policy_poll_interval,
                install=self.apply_policy,
                refused=self._policy_refused,
            )
            self._policy_reload.begin()

    async def stop(self) -> None:
        """Close every connection and forget every session (a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        await self.revocation.stop()
        if self._policy_reload is not None:
            await self._policy_reload.stop()
        if self._server is not None:
            self._server.close()
        for peer in list(self._connections):
            peer.ended_by = peer.ended_by or Disconnect.BROKER_SHUTDOWN
            peer.close()
        if self._server is not None:
            await self._server.wait_closed()
        self.engine.shutdown()
        self.metrics.close()

    async def __aenter__(self) -> FleetBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"mqtts://{self.settings.host}:{self.port}"

    @property
    def connected_devices(self) -> set[str]:
        return set(self._sessions)

    def session_peers(self) -> dict[str, str]:
        """Connected device id -> its peer address (``ip:port``)."""
        return {device_id: peer.peer_address for device_id, peer in self._sessions.items()}

    def session_serials(self) -> dict[str, int | None]:
        """Connected device id -> the serial of the certificate its session was opened with."""
        return {device_id: peer.serial for device_id, peer in self._sessions.items()}

    # -- TLS context and CRL (kept by LiveRevocation) -----------------------------------------

    @property
    def handshake_tracer(self) -> HandshakeTracer:
        """Reads each handshake's signature scheme (every context of the broker reports here)."""
        return self.revocation.tracer

    @property
    def tls_context(self) -> SSL.Context:
        """The context of new handshakes: rebuilt with each new CRL."""
        return self.revocation.context

    @property
    def forgives_stale_crl(self) -> bool:
        return self.revocation.forgives_stale_crl

    def issued_by_retired_ca(self, leaf: crypto.X509) -> bool:
        return self.revocation.issued_by_retired_ca(leaf)

    async def install_crl(self, crl: CrlState) -> None:
        """Use ``crl`` for new handshakes and close every live session it revokes."""
        await self.revocation.install(crl)

    def _close_sessions_revoked_by(self, crl: CrlState) -> None:
        for serial in crl.revoked & self._by_serial.keys():
            for peer in list(self._by_serial.get(serial, ())):
                peer.close_by_broker(SessionEnd.REVOKED)
        for peers in list(self._by_serial.values()):
            for peer in list(peers):
                if peer.issuer is None:
                    continue
                if peer.issuer not in crl.issuers:
                    peer.close_by_broker(SessionEnd.ISSUER_RETIRED)
                elif peer.issuer_key_id in crl.revoked_issuer_keys:
                    peer.close_by_broker(SessionEnd.ISSUER_REVOKED)

    # -- the access policy --------------------------------------------------------------------

    def apply_policy(self, policy: AccessPolicy) -> None:
        """Use ``policy`` from now on: new requests at once; every live device session gets
        its new rights and loses the subscriptions they no longer grant (counted, logged)."""
        self.policy = policy
        revoked = 0
        for peer in list(self._sessions.values()):
            if peer.identity is None or peer.identity.role != DEVICE:
                continue  # claims and the admin keep their fixed rights
            window = policy.window(peer.identity, dt.datetime.now(dt.UTC))
            if not window.allowed:
                peer.close_by_broker(SessionEnd.WINDOW_CLOSED, window.text)
                continue
            _close_at_window_end(peer, window)
            rights = policy.rights(peer.identity)
            peer.change_rights(rights)
            session = peer.mqtt_session
            for topic_filter in self.engine.narrow(session, rights) if session else ():
                revoked += 1
                self.metrics.subscriptions_revoked.inc()
                self.log_event(BrokerEvent.SUBSCRIPTION_REVOKED, peer, detail=topic_filter)
        self.metrics.policy_reloads.labels("installed").inc()
        detail = f"{policy.source}: {len(policy.rules)} rules, {revoked} subscription(s) revoked"
        self.log_event(BrokerEvent.POLICY_INSTALLED, None, detail=detail)

    def _policy_refused(self, problem: str) -> None:
        self.metrics.policy_reloads.labels("refused").inc()
        self.log_event(BrokerEvent.POLICY_REJECTED, None, detail=problem)

    # -- connections (called by PeerConnection) ---------------------------------------------

    def shared_issuer(self, issuer: x509.Name) -> x509.Name:
        """One object per issuer name, however many connections hold it."""
        return self._issuer_names.setdefault(issuer, issuer)

    def connection_opened(self, peer: PeerConnection) -> None:
        self._connections.add(peer)

    def connection_closed(self, peer: PeerConnection) -> None:
        self._connections.discard(peer)
        serial = peer.serial if peer.handshaken else None
        if serial is not None and serial in self._by_serial:
            self._by_serial[serial].discard(peer)
            if not self._by_serial[serial]:
                del self._by_serial[serial]
        if peer.authorized and peer.client_id is not None:
            if self._sessions.get(peer.client_id) is peer:
                del self._sessions[peer.client_id]
            self.metrics.connected.dec()
            self.lifecycle.disconnected(peer, peer.ended_by or Disconnect.CONNECTION_LOST)
            if self.settings.log_connections:
                self.log_event(BrokerEvent.DISCONNECTED, peer)

    def handshake_seconds(self, seconds: float, *, ok: bool) -> None:
        self.metrics.handshake_seconds.labels("ok" if ok else "failed").observe(seconds)

    def handshake_accepted(self, peer: PeerConnection) -> bool:
        """After a good handshake: the CRL in force now decides, and the stale-CRL policy."""
        serial, crl = peer.serial, self.revocation.crl
        assert serial is not None and peer.issuer is not None
        if peer.issuer not in crl.issuers:
            # OpenSSL refuses such a chain while it checks CRLs; a fail-open broker must too.
            issuer = peer.issuer.rfc4514_string()
            self.record(peer, Outcome.UNKNOWN_CA, f"issuing CA {issuer} is not trusted (retired?)")
            peer.close()
            return False
        if serial in crl.revoked:
            # The handshake began on the context of an older CRL and ended after a newer one
            # was installed: the newer one decides.
            self.record(peer, Outcome.REVOKED, f"revoked in CRL #{crl.number}")
            peer.close()
            return False
        if crl.is_stale(dt.datetime.now(dt.UTC)):
            if self.settings.revocation_policy is RevocationPolicy.FAIL_CLOSED:
                # OpenSSL refuses a stale CRL from the next whole second on; we do it exactly.
                self.record(peer, Outcome.CRL_STALE, f"CRL #{crl.number} is past nextUpdate")
                peer.close()
                return False
            if serial in crl.revoked:
                self.record(
                    peer, Outcome.REVOKED, "revoked in the last known CRL (stale, fail-open)"
                )
                peer.close()
                return False
            self.metrics.stale_admissions.inc()
            self.log_event(
                BrokerEvent.ADMITTED_STALE_CRL,
                peer,
                detail=f"CRL #{crl.number} is past nextUpdate",
            )
        self._by_serial.setdefault(serial, set()).add(peer)
        return True

    def admit_connect(self, peer: PeerConnection, request: ConnectRequest) -> ConnackCode:
        """Decide a CONNECT from the certificate of the connection in hand, before any session
        is touched.

        The client id must fit the certificate (see :func:`_client_id_problem`), a device's or
        claim's env the broker's, and the will topic the certificate's publish rights. A refusal
        touches no session, live or stored; an admission takes the client id over from any
        older connection of the same identity.
        """
        identity = peer.identity
        assert identity is not None
        client_id = request.client_id
        problem = _client_id_problem(identity, client_id)
        if problem is not None:
            self.record(peer, Outcome.IDENTITY_MISMATCH, problem)
            return ConnackCode.NOT_AUTHORIZED
        if (
            self.settings.env is not None
            and identity.role != ADMIN
            and identity.env != self.settings.env
        ):
            self.record(
                peer,
                Outcome.ENV_MISMATCH,
                f"{identity.env} certificate refused by a {self.settings.env} broker",
            )
            return ConnackCode.NOT_AUTHORIZED
        if peer.policy_problem is not None:
            self.record(peer, Outcome.POLICY_REFUSED, peer.policy_problem)
            return ConnackCode.NOT_AUTHORIZED
        if identity.role == DEVICE:
            window = self.policy.window(identity, dt.datetime.now(dt.UTC))
            if not window.allowed:
                self.record(peer, Outcome.OUTSIDE_WINDOW, window.text)
                return ConnackCode.NOT_AUTHORIZED
            _close_at_window_end(peer, window)
        if identity.role == CLAIM:
            limit = self.settings.max_claim_sessions
            live = sum(1 for other in self._by_serial.get(peer.serial or 0, ()) if other.authorized)
            if live >= limit:
                self.record(
                    peer,
                    Outcome.TOO_MANY_SESSIONS,
                    f"claim {identity.device_id!r} already holds {live} sessions (at most {limit})",
                )
                return ConnackCode.SERVER_UNAVAILABLE
            peer.rights = claim_rights(client_id.removeprefix(ENROLL_CLIENT_PREFIX))
        elif identity.role == ADMIN:
            peer.rights = ADMIN_RIGHTS
        assert peer.rights is not None
        if request.will is not None and not peer.rights.may_publish(request.will.topic):
            self.acl_denied(peer, "will", request.will.topic)
            self.record(peer, Outcome.WILL_DENIED, f"will topic {request.will.topic!r}")
            return ConnackCode.NOT_AUTHORIZED
        previous = self._sessions.get(client_id)
        if previous is not None and previous is not peer:
            previous.close_by_broker(SessionEnd.TAKEOVER)
        self._sessions[client_id] = peer
        peer.client_id = client_id
        peer.authorized = True
        peer.connected_at = time.monotonic()
        self.metrics.connected.inc()
        self.record(peer, Outcome.OK, None)
        self.lifecycle.connected(peer, request)
        if self.settings.log_connections:
            self.log_event(
                BrokerEvent.CONNECTED, peer, group=peer.group, signature=peer.device_signature
            )
        return ConnackCode.ACCEPTED

    def acl_denied(self, peer: PeerConnection, action: str, topic: str) -> None:
        self.metrics.acl_denied.labels(action).inc()
        self.log_event(BrokerEvent.ACL_DENIED, peer, detail=f"{action} {topic}")

    def session_ended_by_broker(
        self, peer: PeerConnection, reason: SessionEnd, detail: str | None = None
    ) -> None:
        self.metrics.sessions_closed.labels(reason).inc()
        self.log_event(BrokerEvent.SESSION_CLOSED, peer, reason=reason, detail=detail)

    def message_dropped(self, reason: str) -> None:
        self.metrics.messages_dropped.labels(reason).inc()

    # -- accounting -------------------------------------------------------------------------

    def record(self, peer: PeerConnection, outcome: Outcome, detail: str | None) -> None:
        """Count the attempt's single outcome; log and keep an event for every rejection."""
        if peer.outcome is not None:
            return
        peer.outcome = outcome
        self.metrics.connections.labels(outcome.value).inc()
        if outcome is not Outcome.OK:
            self.log_event(
                BrokerEvent.REJECTED,
                peer,
                reason=outcome.value,
                detail=detail,
                group=peer.group,
                signature=peer.device_signature,
            )
            self.lifecycle.rejected(peer, outcome, detail)

    def log_event(self, event: BrokerEvent, peer: PeerConnection | None, **fields: Any) -> None:
        record: Event = {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        if peer is not None:
            serial = peer.serial
            record |= {
                "device": peer.device_id,
                "serial": format(serial, "X") if serial is not None else None,
                "peer": peer.peer_address,
            }
            if peer.identity is not None and peer.identity.role != DEVICE:
                record |= {"role": peer.identity.role, "client_id": peer.client_id}
        record |= {key: value for key, value in fields.items() if value is not None}
        self.events.append(record)
        if self.settings.event_log:
            events_log.warning(json.dumps(record))
        for listener in list(self._event_listeners):
            listener(record)

    async def wait_for_event(self, predicate: Callable[[Event], bool], timeout: float) -> Event:
        """Return the first past or future event matching ``predicate`` (TimeoutError if none)."""
        for record in self.events:
            if predicate(record):
                return record
        found: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

        def listener(record: Event) -> None:
            if predicate(record) and not found.done():
                found.set_result(record)

        self._event_listeners.append(listener)
        try:
            return await asyncio.wait_for(found, timeout)
        finally:
            self._event_listeners.remove(listener)


def _close_at_window_end(peer: PeerConnection, window: WindowVerdict) -> None:
    seconds = (window.closes - dt.datetime.now(dt.UTC)).total_seconds() if window.closes else None
    ends = f"{window.closes:%Y-%m-%d %H:%M:%S}" if window.closes else ""
    peer.close_when_window_ends(seconds, f"its access window closed at {ends} UTC")


def _client_id_problem(identity: DeviceIdentity, client_id: str | None) -> str | None:
    """Why ``client_id`` may not be used with this certificate (None: it may).

    A device must use its own id; a claim certificate, shared by a batch of new devices,
    ``enroll:<request-id>``; the admin ``admin:<its name>``. Device ids never contain ':', so
    neither of the others can take a device's session over.
    """
    if identity.role == DEVICE:
        expected = identity.device_id
    elif identity.role == ADMIN:
        expected = f"{ADMIN_CLIENT_PREFIX}{identity.device_id}"
    else:
        request_id = (client_id or "").removeprefix(ENROLL_CLIENT_PREFIX)
        if client_id == f"{ENROLL_CLIENT_PREFIX}{request_id}" and is_request_id(request_id):
            return None
        return (
            f"client id {client_id!r} is not 'enroll:<request id>' for claim "
            f"{identity.device_id!r} (request id: 8-64 of A-Z a-z 0-9 _ -)"
        )
    if client_id != expected:
        return f"client id {client_id!r} is not the certificate's {identity.role} id {expected!r}"
    return None

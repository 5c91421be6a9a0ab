"""FleetBroker: the accept loop, the admission policy and live revocation, around the MQTT
engine (:mod:`broker.engine`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import urllib.request
from collections import deque
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto

from broker.acl import ADMIN_RIGHTS, claim_rights
from broker.config import BrokerSettings, RevocationPolicy
from broker.connection import PeerConnection
from broker.engine import MqttEngine
from broker.metrics import BrokerMetrics
from broker.outcomes import UNABLE_TO_GET_CRL as _UNABLE_TO_GET_CRL
from broker.outcomes import BrokerEvent, Outcome, SessionEnd
from broker.packets import ConnackCode, ConnectRequest
from broker.tls import BrokerError, CrlHistory, build_server_context
from fleet.kernel.identity import ADMIN, CLAIM, DEVICE, DeviceIdentity
from fleet.kernel.mqtt_api import ADMIN_CLIENT_PREFIX, ENROLL_CLIENT_PREFIX, is_request_id
from fleet.store.crls import (
    CrlError,
    CrlState,
    load_crl,
    load_issuers,
    load_retired_key_ids,
    parse_crls,
)
from fleet.store.workspace import WorkspacePaths

log = logging.getLogger("mtls_fleet.broker")
events_log = logging.getLogger("mtls_fleet.broker.events")

_INVALID_PURPOSE = 26  # X509_V_ERR_INVALID_PURPOSE
_REVOKED = 23  # X509_V_ERR_CERT_REVOKED
_CRL_PAST_NEXT_UPDATE = (11, 12)  # X509_V_ERR_CRL_NOT_YET_VALID, X509_V_ERR_CRL_HAS_EXPIRED
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
        self._issuers = load_issuers(self.paths)
        self._retired_key_ids = load_retired_key_ids(self.paths)
        self._crl_history = CrlHistory(self.paths.broker_dir / "crl-seen.json")
        # The file's identity is taken *before* it is read: a CRL written between the two is
        # seen as a change by the watcher and loaded, never missed.
        self._crl_signature: tuple[int, int, int] | None = self._stat_crl()
        self._crl: CrlState = load_crl(self.paths.crl, self._issuers)
        problem = self._crl_history.older_than_seen(self._crl)
        if problem is not None:
            raise BrokerError(
                f"{self.paths.crl}: {problem}; refusing to start on an older CRL (an old backup "
                "restored?): run 'fleet crl publish' to publish a current one"
            )
        self._crl_history.record(self._crl)
        self._crl_fetched: bytes | None = None  # the last CRL fetched from settings.crl_url
        self._crl_url_reachable = True
        self.tls_context: SSL.Context = self._build_context(self._crl)
        self._connections: set[PeerConnection] = set()
        self._by_serial: dict[int, set[PeerConnection]] = {}
        self._sessions: dict[str, PeerConnection] = {}
        self._issuer_names: dict[x509.Name, x509.Name] = {}
        self._event_listeners: list[Callable[[Event], None]] = []
        self._server: asyncio.Server | None = None
        self.engine = MqttEngine(settings.session_limits, on_drop=self.message_dropped)
        self._tasks: list[asyncio.Task[None]] = []
        self._stale_timer: asyncio.TimerHandle | None = None
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.settings.crl_url:
            await self._first_crl_from_url(self.settings.crl_url)
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
        self._install_crl_metrics(self._crl)
        self._schedule_staleness(self._crl)
        self._tasks.append(loop.create_task(self._watch_crl()))

    async def stop(self) -> None:
        """Close every connection and forget every session (a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        if self._server is not None:
            self._server.close()
        for peer in list(self._connections):
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

    # -- TLS context and CRL ----------------------------------------------------------------

    def _build_context(self, crl: CrlState) -> SSL.Context:
        """The CRL is always checked; under fail-open the verify callback forgives only its
        being past nextUpdate, so a known revocation still ends the handshake with the
        ``certificate_revoked`` alert the device can report."""
        return build_server_context(self.paths, crl=crl, check_crl=True, verify_callback=_verify)

    @property
    def forgives_stale_crl(self) -> bool:
        return self.settings.revocation_policy is RevocationPolicy.FAIL_OPEN

    def _stat_crl(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.paths.crl)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    async def _watch_crl(self) -> None:
        """Pick up every new CRL within one poll interval, without a restart."""
        url = self.settings.crl_url
        interval = self.settings.crl_url_interval if url else self.settings.crl_poll_interval
        while True:
            await asyncio.sleep(interval)
            data = await (self._fetch_new_crl(url) if url else self._read_new_crl())
            if data is None:
                continue
            try:
                self._issuers = await asyncio.to_thread(load_issuers, self.paths)  # CA rotation
                self._retired_key_ids = await asyncio.to_thread(load_retired_key_ids, self.paths)
                crl = await asyncio.to_thread(
                    parse_crls, data, self._issuers, source=url or str(self.paths.crl)
                )
            except CrlError as exc:
                log.error("CRL update rejected, keeping CRL #%s: %s", self._crl.number, exc)
                self.log_event(BrokerEvent.CRL_REJECTED, None, detail=str(exc))
                continue
            problem = self._crl_history.older_than_seen(crl)
            if problem is not None:
                log.error("CRL update rejected, keeping CRL #%s: %s", self._crl.number, problem)
                self.log_event(BrokerEvent.CRL_REJECTED, None, detail=problem)
                continue
            await self.install_crl(crl)

    async def _first_crl_from_url(self, url: str) -> None:
        """Before listening, prefer the served CRL to the workspace file (it may be newer)."""
        data = await self._fetch_new_crl(url)
        if data is None:
            return  # unreachable: start on the file's CRL, logged; the watcher keeps trying
        try:
            crl = await asyncio.to_thread(parse_crls, data, self._issuers, source=url)
        except CrlError as exc:
            log.error("CRL from %s rejected, starting on CRL #%s: %s", url, self._crl.number, exc)
            return
        if crl.number >= self._crl.number and self._crl_history.older_than_seen(crl) is None:
            self._crl = crl
            self._crl_history.record(crl)
            self.tls_context = await asyncio.to_thread(self._build_context, crl)

    async def _read_new_crl(self) -> bytes | None:
        """The CRL file's content when it changed since the last look, else None."""
        signature = self._stat_crl()
        if signature is None or signature == self._crl_signature:
            return None
        self._crl_signature = signature
        try:
            return await asyncio.to_thread(self.paths.crl.read_bytes)
        except FileNotFoundError:
            return None

    async def _fetch_new_crl(self, url: str) -> bytes | None:
        """The CRL served at ``url`` when it changed since the last fetch, else None.

        An unreachable URL keeps the CRL in force (logged once per outage); its nextUpdate and
        the revocation policy decide what happens when the outage lasts.
        """
        try:
            data = await asyncio.to_thread(_fetch, url, self.settings.crl_url_interval + 5)
        except OSError as exc:
            if self._crl_url_reachable:
                log.error(
                    "cannot fetch the CRL from %s (%s); keeping CRL #%s", url, exc, self._crl.number
                )
                self.log_event(BrokerEvent.CRL_FETCH_FAILED, None, detail=f"{url}: {exc}")
            self._crl_url_reachable = False
            return None
        if not self._crl_url_reachable:
            self.log_event(BrokerEvent.CRL_FETCH_RECOVERED, None, detail=url)
        self._crl_url_reachable = True
        if data == self._crl_fetched:
            return None
        self._crl_fetched = data
        return data

    async def install_crl(self, crl: CrlState) -> None:
        """Use ``crl`` for new handshakes and close every live session it revokes."""
        self.tls_context = await asyncio.to_thread(self._build_context, crl)
        self._crl = crl
        await asyncio.to_thread(self._crl_history.record, crl)
        self._install_crl_metrics(crl)
        self._schedule_staleness(crl)
        self.log_event(
            BrokerEvent.CRL_INSTALLED, None, detail=f"CRL #{crl.number}, {len(crl.revoked)} revoked"
        )
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

    def _install_crl_metrics(self, crl: CrlState) -> None:
        self.metrics.crl_number.set(crl.number)
        self.metrics.crl_next_update.set(crl.next_update.timestamp())
        self.metrics.crl_stale.set(1 if crl.is_stale(dt.datetime.now(dt.UTC)) else 0)

    def _schedule_staleness(self, crl: CrlState) -> None:
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        delay = (crl.next_update - dt.datetime.now(dt.UTC)).total_seconds()
        loop = asyncio.get_running_loop()
        self._stale_timer = loop.call_later(max(0.0, delay), self._crl_went_stale, crl)

    def _crl_went_stale(self, crl: CrlState) -> None:
        if crl is not self._crl:
            return
        self.metrics.crl_stale.set(1)
        policy = self.settings.revocation_policy
        consequence = (
            "refusing every new handshake until a fresh CRL is published"
            if policy is RevocationPolicy.FAIL_CLOSED
            else "admitting handshakes on the stale CRL (its revocations still refused in the "
            "handshake)"
        )
        log.error(
            "CRL #%s passed its nextUpdate %s: %s (--revocation-policy %s); run 'fleet crl publish'",
            crl.number,
            crl.next_update.isoformat(),
            consequence,
            policy.value,
        )
        self.log_event(BrokerEvent.CRL_STALE, None, detail=f"policy {policy.value}: {consequence}")

    def issued_by_retired_ca(self, leaf: crypto.X509) -> bool:
        """Whether ``leaf`` names a retired issuing CA as its issuer (authority key id)."""
        try:
            aki = leaf.to_cryptography().extensions.get_extension_for_class(
                x509.AuthorityKeyIdentifier
            )
        except x509.ExtensionNotFound:
            return False
        return aki.value.key_identifier in self._retired_key_ids

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
            if self.settings.log_connections:
                self.log_event(BrokerEvent.DISCONNECTED, peer)

    def handshake_seconds(self, seconds: float, *, ok: bool) -> None:
        self.metrics.handshake_seconds.labels("ok" if ok else "failed").observe(seconds)

    def handshake_accepted(self, peer: PeerConnection) -> bool:
        """After a good handshake: the CRL in force now decides, and the stale-CRL policy."""
        serial = peer.serial
        assert serial is not None and peer.issuer is not None
        if peer.issuer not in self._crl.issuers:
            # OpenSSL refuses such a chain while it checks CRLs; a fail-open broker must too.
            issuer = peer.issuer.rfc4514_string()
            self.record(peer, Outcome.UNKNOWN_CA, f"issuing CA {issuer} is not trusted (retired?)")
            peer.close()
            return False
        if serial in self._crl.revoked:
            # The handshake began on the context of an older CRL and ended after a newer one
            # was installed: the newer one decides.
            self.record(peer, Outcome.REVOKED, f"revoked in CRL #{self._crl.number}")
            peer.close()
            return False
        if self._crl.is_stale(dt.datetime.now(dt.UTC)):
            if self.settings.revocation_policy is RevocationPolicy.FAIL_CLOSED:
                # OpenSSL refuses a stale CRL from the next whole second on; we do it exactly.
                self.record(peer, Outcome.CRL_STALE, f"CRL #{self._crl.number} is past nextUpdate")
                peer.close()
                return False
            if serial in self._crl.revoked:
                self.record(
                    peer, Outcome.REVOKED, "revoked in the last known CRL (stale, fail-open)"
                )
                peer.close()
                return False
            self.metrics.stale_admissions.inc()
            self.log_event(
                BrokerEvent.ADMITTED_STALE_CRL,
                peer,
                detail=f"CRL #{self._crl.number} is past nextUpdate",
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
        self.metrics.connected.inc()
        self.record(peer, Outcome.OK, None)
        if self.settings.log_connections:
            self.log_event(BrokerEvent.CONNECTED, peer)
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
            self.log_event(BrokerEvent.REJECTED, peer, reason=outcome.value, detail=detail)

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


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # settings allow http(s) only
        data: bytes = response.read(16 * 1024 * 1024)
        return data


def _allows_client_auth(cert: crypto.X509) -> bool:
    """Whether the leaf has an EKU extension that lists clientAuth (required, not implied)."""
    try:
        usage = cert.to_cryptography().extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except (x509.ExtensionNotFound, ValueError):
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage.value


def _verify(
    connection: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """Remember the leaf and the first error for the logs; the verdict stays a failure.

    OpenSSL stops at the first error it is told about, often at the intermediate (an unknown
    CA), before the leaf is ever shown. So an error above the leaf is noted and verification
    allowed to reach the leaf, where the failure is returned. The connection also refuses any
    handshake that noted an error, should OpenSSL finish without asking about the leaf.
    """
    peer = connection.get_app_data()
    if not isinstance(peer, PeerConnection):
        return bool(ok)
    if not ok and errnum in _CRL_PAST_NEXT_UPDATE and peer.broker.forgives_stale_crl:
        return True  # fail-open: the stale CRL still revokes what it lists
    if not ok and errnum == _REVOKED and depth > 0:
        # its issuing CA is on the root's CRL: refused at once, with the certificate_revoked alert
        peer.verify_code, peer.issuer_revoked = errnum, True
        return False
    if depth == 0:
        peer.leaf = cert
        if ok and peer.verify_code is None and not _allows_client_auth(cert):
            # OpenSSL's purpose check lets a leaf without any EKU pass as every purpose.
            peer.verify_code = _INVALID_PURPOSE
            return False
    only_crl_missing = peer.verify_code == _UNABLE_TO_GET_CRL
    if not ok and (peer.verify_code is None or only_crl_missing):
        peer.verify_code = errnum
    if (
        not ok
        and errnum == _UNABLE_TO_GET_CRL
        and depth == 0
        and peer.verify_code == errnum
        and not peer.broker.issued_by_retired_ca(cert)
    ):
        # OpenSSL checks revocation before signatures and dates: look on, so that a leaf from
        # an expired intermediate is refused as expired, not as "no CRL for its issuer".
        # (A retired issuer is refused at once: looking on would end in an internal_error alert.)
        return True
    if depth > 0:
        if not ok and only_crl_missing:
            return False  # the better reason, with its own alert
        return True if peer.verify_code is not None else bool(ok)
    return peer.verify_code is None and bool(ok)

"""Live revocation: the CRL in force, kept current without a restart.

Loaded at start (never older than one this workspace's brokers already enforced), watched for
changes (the workspace file, or ``--crl-url``), each new one built into a fresh TLS context for
new handshakes (the broker then closes the live sessions it revokes), and marked stale at its
nextUpdate, when the revocation policy decides what happens.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from cryptography import x509
from OpenSSL import SSL, crypto

from broker.client_verify import verify_client
from broker.config import BrokerSettings, RevocationPolicy
from broker.crl_source import CrlSource
from broker.metrics import BrokerMetrics
from broker.outcomes import BrokerEvent
from broker.tls import BrokerError, CrlHistory, build_server_context
from fleet.kernel.handshake_trace import HandshakeTracer
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

LogEvent = Callable[[BrokerEvent, str], None]


class LiveRevocation:
    """The CRL in force and the TLS context built on it (:attr:`context`)."""

    def __init__(
        self,
        settings: BrokerSettings,
        paths: WorkspacePaths,
        metrics: BrokerMetrics,
        *,
        log_event: LogEvent,
        on_installed: Callable[[CrlState], Awaitable[None] | None],
    ) -> None:
        self.settings, self.paths, self.metrics = settings, paths, metrics
        self.tracer = HandshakeTracer()  # every context's: the group and scheme of each peer
        self._log_event = log_event
        self._on_installed = on_installed
        self._issuers = load_issuers(paths)
        self._retired_key_ids = load_retired_key_ids(paths)
        self._history = CrlHistory(paths.broker_dir / "crl-seen.json")
        self._source = CrlSource(
            paths.crl,
            settings.crl_url,
            fetch_timeout=settings.crl_url_interval + 5,
            log_event=log_event,
        )  # before the first read: a CRL written meanwhile is seen as a change
        self.crl: CrlState = load_crl(paths.crl, self._issuers)
        problem = self._history.older_than_seen(self.crl)
        if problem is not None:
            raise BrokerError(
                f"{paths.crl}: {problem}; refusing to start on an older CRL (an old backup "
                "restored?): run 'fleet crl publish' to publish a current one"
            )
        self._history.record(self.crl)
        self.context: SSL.Context = self._build_context(self.crl)
        self._watcher: asyncio.Task[None] | None = None
        self._stale_timer: asyncio.TimerHandle | None = None

    @property
    def forgives_stale_crl(self) -> bool:
        return self.settings.revocation_policy is RevocationPolicy.FAIL_OPEN

    def issued_by_retired_ca(self, leaf: crypto.X509) -> bool:
        """Whether ``leaf`` names a retired issuing CA as its issuer (authority key id)."""
        try:
            aki = leaf.to_cryptography().extensions.get_extension_for_class(
                x509.AuthorityKeyIdentifier
            )
        except x509.ExtensionNotFound:
            return False
        return aki.value.key_identifier in self._retired_key_ids

    # -- life cycle -------------------------------------------------------------------------

    async def prefer_served_crl(self) -> None:
        """Before listening, prefer the CRL served at ``--crl-url`` to the workspace file (it
        may be newer); unreachable, the broker starts on the file's and the watcher retries."""
        url = self.settings.crl_url
        if url is None:
            return
        data = await self._source.fetch(keeping=self.crl.number)
        if data is None:
            return
        try:
            crl = await asyncio.to_thread(parse_crls, data, self._issuers, source=url)
        except CrlError as exc:
            log.error("CRL from %s rejected, starting on CRL #%s: %s", url, self.crl.number, exc)
            return
        if crl.number >= self.crl.number and self._history.older_than_seen(crl) is None:
            self.crl = crl
            self._history.record(crl)
            self.context = await asyncio.to_thread(self._build_context, crl)

    def begin(self) -> None:
        """Publish the metrics, arm the staleness timer and start watching for new CRLs."""
        self._install_metrics(self.crl)
        self._schedule_staleness(self.crl)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._stale_timer is not None:
            self._stale_timer.cancel()

    async def install(self, crl: CrlState) -> None:
        """Use ``crl`` for new handshakes; then ``on_installed`` closes what it revokes."""
        self.context = await asyncio.to_thread(self._build_context, crl)
        self.crl = crl
        await asyncio.to_thread(self._history.record, crl)
        self._install_metrics(crl)
        self._schedule_staleness(crl)
        self._log_event(BrokerEvent.CRL_INSTALLED, f"CRL #{crl.number}, {len(crl.revoked)} revoked")
        done = self._on_installed(crl)
        if done is not None:
            await done

    # -- inside -----------------------------------------------------------------------------

    def _build_context(self, crl: CrlState) -> SSL.Context:
        """The CRL is always checked; under fail-open the verify callback forgives only its
        being past nextUpdate, so a known revocation still ends the handshake with the
        ``certificate_revoked`` alert the device can report."""
        return build_server_context(
            self.paths,
            crl=crl,
            check_crl=True,
            verify_callback=verify_client,
            groups=self.settings.groups,
            tracer=self.tracer,
        )

    async def _watch(self) -> None:
        """Pick up every new CRL within one poll interval, without a restart."""
        s = self.settings
        interval = s.crl_url_interval if s.crl_url else s.crl_poll_interval
        while True:
            await asyncio.sleep(interval)
            data = await self._source.changed(keeping=self.crl.number)
            if data is None:
                continue
            try:
                self._issuers = await asyncio.to_thread(load_issuers, self.paths)  # CA rotation
                self._retired_key_ids = await asyncio.to_thread(load_retired_key_ids, self.paths)
                crl = await asyncio.to_thread(
                    parse_crls, data, self._issuers, source=self._source.name
                )
            except CrlError as exc:
                self._reject(str(exc))
                continue
            problem = self._history.older_than_seen(crl)
            if problem is not None:
                self._reject(problem)
                continue
            await self.install(crl)

    def _reject(self, problem: str) -> None:
        log.error("CRL update rejected, keeping CRL #%s: %s", self.crl.number, problem)
        self._log_event(BrokerEvent.CRL_REJECTED, problem)

    def _install_metrics(self, crl: CrlState) -> None:
        self.metrics.crl_number.set(crl.number)
        self.metrics.crl_next_update.set(crl.next_update.timestamp())
        self.metrics.crl_stale.set(1 if crl.is_stale(dt.datetime.now(dt.UTC)) else 0)

    def _schedule_staleness(self, crl: CrlState) -> None:
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        delay = (crl.next_update - dt.datetime.now(dt.UTC)).total_seconds()
        loop = asyncio.get_running_loop()
        self._stale_timer = loop.call_later(max(0.0, delay), self._went_stale, crl)

    def _went_stale(self, crl: CrlState) -> None:
        if crl is not self.crl:
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
        self._log_event(BrokerEvent.CRL_STALE, f"policy {policy.value}: {consequence}")

"""Where the broker's CRL comes from: the workspace file (a change seen by its identity on
disk) or a URL (``--crl-url``: fetched, a change seen by its content)."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import Callable
from pathlib import Path

from broker.outcomes import BrokerEvent
from fleet.kernel.files import file_identity

log = logging.getLogger("mtls_fleet.broker")

_MAX_CRL_BYTES = 16 * 1024 * 1024


class CrlSource:
    """Hands out the CRL's bytes each time they changed; ``log_event`` hears of outages."""

    def __init__(
        self,
        path: Path,
        url: str | None,
        *,
        fetch_timeout: float,
        log_event: Callable[[BrokerEvent, str], None],
    ) -> None:
        self.path, self.url = path, url
        self._fetch_timeout = fetch_timeout
        self._log_event = log_event
        # The file's identity is taken *before* it is first read: a CRL written between the
        # two is then seen as a change by the next look and loaded, never missed.
        self._signature = file_identity(self.path)
        self._fetched: bytes | None = None  # the last CRL fetched from the URL
        self._reachable = True

    @property
    def name(self) -> str:
        return self.url or str(self.path)

    async def changed(self, *, keeping: int) -> bytes | None:
        """The CRL when it changed since the last look, else None (``keeping``: the number
        of the CRL in force, for the logs)."""
        return await (self.fetch(keeping=keeping) if self.url else self._read())

    async def _read(self) -> bytes | None:
        signature = file_identity(self.path)
        if signature is None or signature == self._signature:
            return None
        self._signature = signature
        try:
            return await asyncio.to_thread(self.path.read_bytes)
        except FileNotFoundError:
            return None

    async def fetch(self, *, keeping: int) -> bytes | None:
        """The CRL served at the URL when it changed since the last fetch, else None.

        An unreachable URL keeps the CRL in force (logged once per outage); its nextUpdate and
        the revocation policy decide what happens when the outage lasts.
        """
        assert self.url is not None
        try:
            data = await asyncio.to_thread(_fetch, self.url, self._fetch_timeout)
        except OSError as exc:
            if self._reachable:
                log.error(
                    "cannot fetch the CRL from %s (%s); keeping CRL #%s", self.url, exc, keeping
                )
                self._log_event(BrokerEvent.CRL_FETCH_FAILED, f"{self.url}: {exc}")
            self._reachable = False
            return None
        if not self._reachable:
            self._log_event(BrokerEvent.CRL_FETCH_RECOVERED, self.url)
        self._reachable = True
        if data == self._fetched:
            return None
        self._fetched = data
        return data


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # settings allow http(s) only
        data: bytes = response.read(_MAX_CRL_BYTES)
        return data

"""Live reload of the access policy: the file is watched like the CRL; a new policy that reads
cleanly is handed over, one that does not is refused (the one in force stays)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from broker.policy import AccessPolicy, PolicyError, load_policy
from fleet.kernel.files import file_identity

log = logging.getLogger("mtls_fleet.broker")


class PolicyReload:
    """Polls ``path`` every ``interval`` seconds; ``install`` gets each new policy and
    ``refused`` the message of each file that could not be used."""

    def __init__(
        self,
        path: Path,
        interval: float,
        *,
        install: Callable[[AccessPolicy], None],
        refused: Callable[[str], None],
    ) -> None:
        self.path, self.interval = path, interval
        self._install, self._refused = install, refused
        self._identity = file_identity(path)  # of the file the broker started with
        self._task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            identity = file_identity(self.path)
            if identity is None or identity == self._identity:
                continue
            self._identity = identity
            try:
                policy = await asyncio.to_thread(load_policy, self.path)
            except PolicyError as exc:
                log.error("policy update refused, keeping the policy in force: %s", exc)
                self._refused(str(exc))
                continue
            self._install(policy)

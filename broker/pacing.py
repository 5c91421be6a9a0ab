"""Spreading bursts of work over event-loop iterations, so nobody else waits a whole burst.

asyncio runs every callback that is ready in one iteration before it polls sockets again.
When ten thousand clients leave at once (or hundreds handshake at once), the work they cause
lands in the same iteration and every other client waits for all of it. A :class:`Pacer`
queues such work and runs at most ``per_iteration`` items per iteration, in arrival order;
traffic of established sessions is never queued behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Pacer:
    """Runs queued callbacks in order, at most ``per_iteration`` per loop iteration."""

    def __init__(self, per_iteration: int) -> None:
        self.per_iteration = per_iteration
        self._queue: deque[Callable[[], None]] = deque()
        self._scheduled = False

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, callback: Callable[[], None]) -> None:
        self._queue.append(callback)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        for _ in range(min(self.per_iteration, len(self._queue))):
            self._queue.popleft()()
        if self._queue:
            asyncio.get_running_loop().call_soon(self._run)
        else:
            self._scheduled = False

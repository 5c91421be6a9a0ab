"""Ctrl-C and SIGTERM as a stop *request*, honoured where stopping is safe.

An exception raised asynchronously inside ``concurrent.futures`` or ``multiprocessing`` can
leave one of their locks held and hang the shutdown. The handlers here only record the
request (and call ``on_stop``); the work loop checks it at points where it can wind down.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


class StopRequest:
    """Set by a signal handler, polled by a work loop."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` here, at a safe point, if a stop was requested."""
        if self.requested:
            raise KeyboardInterrupt


@contextmanager
def stop_on_signals(*, on_stop: Callable[[], None] | None = None) -> Iterator[StopRequest]:
    """While active, SIGINT and SIGTERM set the yielded request instead of raising.

    Only the main thread can own signal handlers; elsewhere the request is never set. A signal
    the process inherited as ignored stays ignored.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum: int, frame: FrameType | None) -> None:
        stop.requested = True
        if on_stop is not None:
            on_stop()

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, request)
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

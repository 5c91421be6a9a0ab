"""What the control plane learns from the broker's lifecycle events (``$fleet/events/#``):
handshake outcomes by reason over time, the sessions open now by tier and environment, and
when each revoked device was cut off. Fed from the MQTT client's thread, read by the dashboard
and the alerts: every method is thread-safe.

Messages are untrusted: each is parsed with limits (:func:`fleet.kernel.lifecycle.parse_event`);
a bad one is counted and dropped, never raised.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet.kernel.lifecycle import EventRejected, Lifecycle, LifecycleEvent, parse_event

Listener = Callable[[LifecycleEvent], None]

OK = "ok"
_MAX_SESSIONS = 1_000_000  # sessions remembered as open (a broker's worth)
_MAX_CUTS = 1000
_SHOWN_AT_LEAST = 60  # buckets: a chart spans 5 minutes (at 5 s) even when the feed is young


@dataclass(frozen=True, slots=True)
class Cut:
    """A session the broker ended because its certificate was revoked."""

    device: str
    at: dt.datetime


class EventFeed:
    """Lifecycle events folded into counts per ``bucket_seconds`` over the last ``keep_seconds``."""

    def __init__(
        self,
        *,
        bucket_seconds: float = 5.0,
        keep_seconds: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bucket_seconds = bucket_seconds
        self._buckets: deque[tuple[float, Counter[str]]] = deque(
            maxlen=max(1, int(keep_seconds / bucket_seconds))
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], tuple[str, str]] = {}  # (device, peer) -> (tier, env)
        self._cuts: deque[Cut] = deque(maxlen=_MAX_CUTS)
        self._listeners: list[Listener] = []
        self.received = 0
        self.malformed = 0
        self.last_problem: str | None = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def receive(self, topic: str, payload: bytes) -> None:
        """One message from ``$fleet/events/#``."""
        try:
            event = parse_event(topic, payload)
        except EventRejected as exc:
            with self._lock:
                self.malformed += 1
                self.last_problem = str(exc)
            return
        with self._lock:
            self.received += 1
            self._fold(event)
        for listener in list(self._listeners):
            listener(event)

    def _fold(self, event: LifecycleEvent) -> None:
        if event.kind is Lifecycle.REJECTED:
            self._count(event.reason or "other")
            return
        key = (event.device or "", event.peer or "")
        if event.kind is Lifecycle.CONNECTED:
            self._count(OK)
            if len(self._open) < _MAX_SESSIONS:
                self._open[key] = (event.tier or "-", event.env or "-")
            return
        self._open.pop(key, None)
        if event.reason == "revoked" and event.device:
            self._cuts.append(Cut(event.device, _parse_ts(event.ts)))

    def _count(self, outcome: str) -> None:
        now = self._clock()
        start = now - now % self.bucket_seconds
        if not self._buckets or self._buckets[-1][0] < start:
            self._buckets.append((start, Counter()))
        self._buckets[-1][1][outcome] += 1

    def outcomes(self) -> dict[str, Any]:
        """``{"t": [bucket start, ISO], "series": {outcome: [count per bucket]}}``, oldest first,
        empty buckets included (a quiet minute shows as zeros, not as a gap)."""
        with self._lock:
            buckets = list(self._buckets)
        if not buckets:
            return {"t": [], "series": {}, "bucket_seconds": self.bucket_seconds}
        first, last = buckets[0][0], buckets[-1][0]
        now = self._clock()
        last = max(last, now - now % self.bucket_seconds)
        count = int((last - first) / self.bucket_seconds) + 1
        count = min(max(count, _SHOWN_AT_LEAST), self._buckets.maxlen or 1)
        starts = [last - (count - 1 - i) * self.bucket_seconds for i in range(count)]
        by_start = {start: counts for start, counts in buckets}
        names = sorted({name for _, counts in buckets for name in counts})
        series = {
            name: [by_start.get(start, Counter())[name] for start in starts] for name in names
        }
        times = [dt.datetime.fromtimestamp(s, dt.UTC).isoformat(timespec="seconds") for s in starts]
        return {"t": times, "series": series, "bucket_seconds": self.bucket_seconds}

    def totals(self, since: float) -> Counter[str]:
        """Outcomes counted in the buckets that started at or after ``since`` (epoch seconds)."""
        with self._lock:
            total: Counter[str] = Counter()
            for start, counts in self._buckets:
                if start >= since - self.bucket_seconds:
                    total.update(counts)
            return total

    def connections(self) -> dict[str, Any]:
        """Sessions open now, by tier and by environment."""
        with self._lock:
            values = list(self._open.values())
        return {
            "total": len(values),
            "by_tier": dict(sorted(Counter(tier for tier, _ in values).items())),
            "by_env": dict(sorted(Counter(env for _, env in values).items())),
        }

    def cut_times(self) -> dict[str, dt.datetime]:
        """Device -> the latest time a broker cut its session for revocation."""
        with self._lock:
            return {cut.device: cut.at for cut in self._cuts}


def _parse_ts(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return dt.datetime.now(dt.UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)

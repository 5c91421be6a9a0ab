"""A swarm run as its web page shows it (``fleet swarm --web PORT``): the progress the swarm
reports a few times a second, kept as time series."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

_POINTS = 3600  # an hour at one point a second


@dataclass(frozen=True, slots=True)
class SwarmProgress:
    """One progress report of a run (what the terminal's live table shows)."""

    elapsed: float
    devices: int
    connected: int
    attempts: dict[str, int] = field(default_factory=dict)  # outcome -> count, so far
    details: dict[str, int] = field(default_factory=dict)  # "outcome: detail" -> count (failures)
    sent: int = 0
    acknowledged: int = 0
    latency_ms: dict[str, float | None] = field(default_factory=dict)  # p50, p90, p99, max
    finished: bool = False


class SwarmFeed:
    """Progress reports folded into series (at most one point per ``every`` seconds)."""

    def __init__(self, title: str, *, every: float = 1.0) -> None:
        self.title = title
        self._every = every
        self._lock = threading.Lock()
        self._latest: SwarmProgress | None = None
        self._points: deque[dict[str, Any]] = deque(maxlen=_POINTS)

    def push(self, progress: SwarmProgress) -> None:
        with self._lock:
            previous = self._points[-1] if self._points else None
            self._latest = progress
            recent = previous is not None and progress.elapsed - previous["t"] < self._every
            if recent and not progress.finished:
                return
            attempts = sum(progress.attempts.values())
            rate = 0.0
            if previous is not None and progress.elapsed > previous["t"]:
                rate = (attempts - previous["attempts"]) / (progress.elapsed - previous["t"])
            self._points.append(
                {
                    "t": round(progress.elapsed, 2),
                    "connected": progress.connected,
                    "attempts": attempts,
                    "attempt_rate": round(rate, 1),
                    "acknowledged": progress.acknowledged,
                    "p50": progress.latency_ms.get("p50"),
                    "p90": progress.latency_ms.get("p90"),
                    "p99": progress.latency_ms.get("p99"),
                }
            )

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            points = list(self._points)
            latest = asdict(self._latest) if self._latest else None
        series = {key: [p[key] for p in points] for key in points[0]} if points else {}
        return {"title": self.title, "latest": latest, "series": series}

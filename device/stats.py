"""Swarm statistics: counts by outcome and a real latency histogram, mergeable across processes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from device.outcomes import ConnectAttempt, ConnectOutcome

_MAX_MICROSECONDS = 120_000_000  # two minutes


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, _MAX_MICROSECONDS, 3)


@dataclass
class SwarmStats:
    """What a swarm (or one shard of it) has seen so far."""

    devices: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    details: Counter[str] = field(default_factory=Counter)
    # the first failure of each kind in words, naming its device: "dev-00003: missing …/cert.pem"
    examples: dict[str, str] = field(default_factory=dict)
    connected_now: int = 0
    connected_at_deadline: int = 0
    sent: int = 0
    acknowledged: int = 0
    disconnects: int = 0
    renewals: int = 0
    renewal_failures: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    ramp_seconds: float | None = None
    interrupted: bool = False
    handshake: HdrHistogram = field(default_factory=_histogram)
    # shards whose worker was lost mid-run (--scheduler): {"worker": address, "devices": n}
    lost_shards: list[dict[str, Any]] = field(default_factory=list)
    # the key exchange of each connection made: "X25519MLKEM768 · mldsa65" (group · broker's scheme)
    negotiated: Counter[str] = field(default_factory=Counter)

    def record(self, attempt: ConnectAttempt) -> None:
        self.attempts[attempt.outcome.value] += 1
        if attempt.outcome is not ConnectOutcome.CONNECTED:
            kind = f"{attempt.outcome.value}: {attempt.detail or '-'}"
            self.details[kind] += 1
            if kind not in self.examples and attempt.message:
                self.examples[kind] = f"{attempt.device_id}: {attempt.message}"
        else:
            self.negotiated[f"{attempt.group or '-'} · {attempt.broker_signature or '-'}"] += 1
        if attempt.outcome is ConnectOutcome.CONNECTED and attempt.total_seconds is not None:
            self.handshake.record_value(max(1, int(attempt.total_seconds * 1_000_000)))

    @property
    def total_attempts(self) -> int:
        return sum(self.attempts.values())

    @property
    def lost(self) -> int:
        return max(0, self.sent - self.acknowledged)

    def percentile_ms(self, percentile: float) -> float | None:
        """Connect latency at ``percentile``; None when no device connected (JSON null)."""
        if self.handshake.get_total_count() == 0:
            return None
        return float(self.handshake.get_value_at_percentile(percentile)) / 1000

    def to_wire(self) -> dict[str, Any]:
        """A picklable snapshot (sent between processes)."""
        return {
            "devices": self.devices,
            "attempts": dict(self.attempts),
            "details": dict(self.details),
            "examples": dict(self.examples),
            "connected_now": self.connected_now,
            "connected_at_deadline": self.connected_at_deadline,
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "disconnects": self.disconnects,
            "renewals": self.renewals,
            "renewal_failures": dict(self.renewal_failures),
            "elapsed": self.elapsed,
            "ramp_seconds": self.ramp_seconds,
            "handshake": self.handshake.encode(),
            "lost_shards": list(self.lost_shards),
            "negotiated": dict(self.negotiated),
        }

    @classmethod
    def merge(cls, snapshots: list[dict[str, Any]]) -> SwarmStats:
        total = cls()
        ramps = []
        for snap in snapshots:
            total.devices += snap["devices"]
            total.attempts.update(snap["attempts"])
            total.details.update(snap["details"])
            for kind, example in snap["examples"].items():
                total.examples.setdefault(kind, example)
            total.connected_now += snap["connected_now"]
            total.connected_at_deadline += snap["connected_at_deadline"]
            total.sent += snap["sent"]
            total.acknowledged += snap["acknowledged"]
            total.disconnects += snap["disconnects"]
            total.renewals += snap["renewals"]
            total.renewal_failures.update(snap["renewal_failures"])
            total.elapsed = max(total.elapsed, snap["elapsed"])
            if snap["ramp_seconds"] is not None:
                ramps.append(snap["ramp_seconds"])
            total.handshake.add(HdrHistogram.decode(snap["handshake"]))
            total.lost_shards += snap.get("lost_shards", [])
            total.negotiated.update(snap.get("negotiated", {}))
        total.ramp_seconds = max(ramps) if ramps and len(ramps) == len(snapshots) else None
        return total

    def summary(self) -> dict[str, Any]:
        """The final report, as ``--json`` writes it."""
        return {
            "devices": self.devices,
            "attempts": self.total_attempts,
            "outcomes": dict(sorted(self.attempts.items())),
            "failure_details": dict(self.details.most_common()),
            "failure_examples": dict(sorted(self.examples.items())),
            "connected_at_deadline": self.connected_at_deadline,
            "messages": {"sent": self.sent, "acknowledged": self.acknowledged, "lost": self.lost},
            "renewals": {"done": self.renewals, "failed": dict(self.renewal_failures)},
            "negotiated": dict(self.negotiated.most_common()),
            "connect_latency_ms": {
                "p50": self.percentile_ms(50),
                "p90": self.percentile_ms(90),
                "p99": self.percentile_ms(99),
                "max": self.percentile_ms(100),
            },
            "ramp_seconds": self.ramp_seconds,
            "ramp_rate": (self.attempts.get("connected", 0) / self.ramp_seconds)
            if self.ramp_seconds
            else None,
            "elapsed_seconds": self.elapsed,
            "interrupted": self.interrupted,
            "lost_shards": self.lost_shards,
            "lost_devices": sum(shard["devices"] for shard in self.lost_shards),
        }

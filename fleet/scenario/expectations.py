"""Checking an ``expect`` step against what the devices and the broker saw.

An expectation is polled until it holds or its deadline passes. "Since the last action" means
since the start of the latest step that was not ``expect`` or ``wait``: reasons and counts are
read in that window, so an earlier rejection cannot satisfy a later expectation.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from device import ConnectOutcome
from fleet.scenario.broker_process import BrokerLog
from fleet.scenario.model import DeviceState, sighting_matches
from fleet.scenario.population import Member, Population
from fleet.scenario.witness import Witness

if TYPE_CHECKING:
    from fleet.scenario.steps import ExpectStep

ACK_GRACE = 2.0  # a QoS 1 message unacknowledged for longer than this counts as lost
_POLL = 0.025
_POLLS_PER_PROGRESS = 10  # a live status every quarter of a second


@dataclass
class Window:
    """The last action: when it began and each device's counters at that moment."""

    start: float
    acted_on: frozenset[str] = frozenset()  # members revoked, rotated or disconnected so far
    acknowledged: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        start: float,
        population: Population,
        acted_on: Iterable[str] = (),
        witness: Witness | None = None,
    ) -> Window:
        window = cls(start, frozenset(acted_on))
        for m in population.members:
            window.acknowledged[m.label] = m.acknowledged
            window.received[m.label] = m.received
            window.drops[m.label] = m.drops
            if witness is not None:
                window.delivered[m.label] = witness.delivered(m.device_id)
        return window


@dataclass
class Verdict:
    passed: bool
    observed: str
    failures: list[str] = field(default_factory=list)  # one line per device or check at fault
    unchecked: list[str] = field(default_factory=list)  # checks that cannot be made here
    devices: list[Member] = field(default_factory=list)


def reasons_seen_by_broker(log: BrokerLog, since: float) -> dict[str, list[str]]:
    """Device id -> the broker's classifications since ``since``, in order. A refusal before
    the broker knew who it was (no certificate) is under the peer's address (``IP:PORT``)."""
    reasons: dict[str, list[str]] = {}
    first = bisect.bisect_left(log.events, since, key=lambda e: float(e["at"]))  # time order
    for event in log.events[first:]:
        who = event.get("device") or event.get("peer")
        if not who:
            continue
        kind = event["event"]
        if kind in ("rejected", "session_closed"):
            reason = str(event.get("reason"))
        elif kind == "connected":
            reason = "ok"
        elif kind in ("acl_denied", "admitted_stale_crl"):
            reason = kind
        else:
            continue
        reasons.setdefault(str(who), []).append(reason)
    return reasons


class Checker:
    """Evaluates one expectation once; :func:`await_expectation` polls it."""

    def __init__(
        self,
        step: ExpectStep,
        population: Population,
        broker: BrokerLog | None,
        window: Window,
        certificates_of: Callable[[str], int] | None = None,
        witness: Witness | None = None,
    ) -> None:
        self.step = step
        self.witness = witness  # what was delivered: received by a subscriber
        self.certificates_of = certificates_of  # the registry's certificate count per device
        self.population = population
        self.broker = broker
        self.window = window
        self.members = population.select(step.devices) if step.devices else []
        self._broker_reasons: dict[str, list[str]] = {}

    def unchecked(self) -> list[str]:
        if self.broker is not None:
            return []
        return [
            f"{name} (the target broker's own view is not observable)"
            for name, value in (
                ("broker", self.step.broker),
                ("broker_event", self.step.broker_event),
                ("signature", self.step.signature),
                ("group in the broker's record", self.step.group),
            )
            if value
        ]

    def evaluate(self) -> Verdict:
        self._broker_reasons = (
            reasons_seen_by_broker(self.broker, self.window.start) if self.broker else {}
        )
        failures: list[str] = []
        for member in self.members:
            failures.extend(self._check_member(member))
        step = self.step
        observed = [self._summary()]
        if step.lost is not None:
            lost = sum(m.unacknowledged(older_than=ACK_GRACE) for m in self.members)
            observed.append(f"lost={lost}")
            if lost > step.lost:
                failures.append(f"{lost} QoS 1 messages unacknowledged after {ACK_GRACE:g} s")
        if step.others_unaffected:
            affected, count = self._affected_others()
            observed.append(f"others unaffected: {count - len(affected)}/{count}")
            failures.extend(affected)
        if step.enrollment_counts is not None:
            got = Counter(m.enrollment or "not tried" for m in self.members)
            observed.append("enrollments " + _top(got))
            wanted = {outcome: n for outcome, n in step.enrollment_counts if n}  # 0: none had it
            if dict(got) != wanted:  # exact: every device named is counted, nothing else
                shown = ", ".join(f"{n}x {o}" for o, n in sorted(got.items()))
                failures.append(f"enrollment outcomes {shown}, expected {_counts(wanted)}")
        if step.broker_event and self.broker is not None:
            seen = self._broker_events(step.broker_event)
            observed.append(f"broker events {step.broker_event}: {seen}")
            if not seen:
                failures.append(f"the broker logged no {step.broker_event!r} event")
        return Verdict(
            not failures,
            "; ".join(o for o in observed if o),
            failures,
            self.unchecked(),
            self.members,
        )

    def _check_member(self, m: Member) -> list[str]:
        step, since = self.step, self.window.start
        problems = []
        state = m.state()
        if step.state is not None:
            ok = state is step.state or (
                step.state is DeviceState.DISCONNECTED and state is DeviceState.REJECTED
            )
            if not ok:
                problems.append(f"state {state.value}")
        if step.device is not None:
            sightings = m.sightings_since(since)
            if not any(sighting_matches(step.device, s.outcome, s.detail) for s in sightings):
                seen = [s.text() for s in sightings[-3:]]
                problems.append(f"device saw {seen or 'nothing'}")
        if step.broker is not None and self.broker is not None:
            reasons = self._reasons_for(m)
            if step.broker not in reasons:
                problems.append(f"broker saw {reasons[-3:] or 'nothing'}")
        if step.drops is not None:
            drops = m.drops - self.window.drops.get(m.label, 0)
            if drops > step.drops:
                problems.append(f"{drops} sessions dropped")
        if step.refusals is not None:
            refused = [
                s
                for s in m.sightings_since(since)
                if s.outcome not in (ConnectOutcome.CONNECTED.value, "dropped")
            ]
            if len(refused) > step.refusals:
                problems.append(f"{len(refused)} attempts failed (latest: {refused[-1].text()})")
        if step.delivered_at_least is not None:
            delivered = self._delivered(m)
            if delivered < step.delivered_at_least:
                acked = m.acknowledged - self.window.acknowledged.get(m.label, 0)
                problems.append(f"{delivered} delivered ({acked} acknowledged)")
        if step.acknowledged_at_least is not None:
            acked = m.acknowledged - self.window.acknowledged.get(m.label, 0)
            if acked < step.acknowledged_at_least:
                problems.append(f"{acked} acknowledged")
        received = m.received - self.window.received.get(m.label, 0)
        if step.received is not None and received != step.received:
            problems.append(f"received {received}")
        if step.received_at_least is not None and received < step.received_at_least:
            problems.append(f"received {received}")
        if step.subscription is not None and m.subscription != step.subscription:
            problems.append(f"subscription {m.subscription or 'none'}")
        if step.enrollment is not None and m.enrollment != step.enrollment:  # exact, never a part
            detail = f" ({m.enrollment_detail})" if m.enrollment_detail else ""
            problems.append(f"enrollment {m.enrollment or 'not tried'}{detail}")
        if step.renewed_at_least is not None:
            problems.extend(self._renewal_problems(m, step.renewed_at_least))
        problems.extend(self._handshake_problems(m))
        if step.renewal_failures is not None and m.renewal_failures > step.renewal_failures:
            failures = m.device.stats.renewal_failures if m.device else {}
            problems.append(f"{m.renewal_failures} renewals failed ({dict(failures)})")
        return [f"{m.label} ({m.device_id}): {', '.join(problems)}"] if problems else []

    def _handshake_problems(self, m: Member) -> list[str]:
        """The group and schemes of ``m``'s latest connection since the last action: on the
        device's side, and (with our broker) in the broker's record of that session."""
        step = self.step
        if step.group is None and step.broker_signature is None and step.signature is None:
            return []
        latest = m.latest_connection(self.window.start)
        if latest is None:
            return ["no connection to read a handshake from"]
        problems = []
        if step.group is not None and latest.group != step.group:
            problems.append(f"group {latest.group or 'none'}")
        if step.broker_signature is not None and latest.broker_signature != step.broker_signature:
            problems.append(f"broker signed with {latest.broker_signature or 'nothing seen'}")
        if self.broker is None or (step.group is None and step.signature is None):
            return problems
        sessions = self._broker_sessions(m)
        if not sessions:
            return [*problems, "the broker logged no session of it"]
        group, signature = sessions[-1].get("group"), sessions[-1].get("signature")
        if step.group is not None and group != step.group:
            problems.append(f"the broker logged group {group or 'none'}")
        if step.signature is not None and signature != step.signature:
            problems.append(f"the broker saw it sign with {signature or 'nothing'}")
        return problems

    def _broker_sessions(self, m: Member) -> list[dict[str, Any]]:
        assert self.broker is not None
        first = bisect.bisect_left(
            self.broker.events, self.window.start, key=lambda e: float(e["at"])
        )
        return [
            e
            for e in self.broker.events[first:]
            if e["event"] == "connected" and e.get("device") == m.device_id
        ]

    def _reasons_for(self, m: Member) -> list[str]:
        """What the broker said about ``m``: by its device id, and by the addresses of its
        attempts (for refusals before the broker could know the device)."""
        reasons = list(self._broker_reasons.get(m.device_id, []))
        for sighting in m.sightings_since(self.window.start):
            if sighting.local_address is not None:
                reasons.extend(self._broker_reasons.get(sighting.local_address, []))
        return reasons

    def _delivered(self, m: Member) -> int:
        """Messages of ``m`` the witness received since the last action (0 without one)."""
        if self.witness is None:
            return 0
        return self.witness.delivered(m.device_id) - self.window.delivered.get(m.label, 0)

    def _renewal_problems(self, m: Member, wanted: int) -> list[str]:
        """Renewed on the device, and on record: the registry holds the original certificate
        and one more per renewal."""
        if m.renewals < wanted:
            return [f"renewed {m.renewals} times"]
        problems = []
        if self.certificates_of is not None:
            held = self.certificates_of(m.device_id)
            if held < wanted + 1:
                problems.append(f"the registry holds {held} certificates")
        return problems

    def _summary(self) -> str:
        if not self.members:
            return ""
        parts = []
        states = Counter(m.state().value for m in self.members)
        parts.append(", ".join(f"{n}/{len(self.members)} {s}" for s, n in states.most_common()))
        since = self.window.start
        if self.step.device is not None:
            seen = Counter(s.text() for m in self.members for s in m.sightings_since(since))
            parts.append("device saw " + _top(seen))
        if self.step.broker is not None and self.broker is not None:
            reasons = Counter(r for m in self.members for r in self._reasons_for(m))
            parts.append("broker saw " + _top(reasons))
        if (
            self.step.delivered_at_least is not None
            or self.step.acknowledged_at_least is not None
            or self.step.received is not None
            or self.step.received_at_least is not None
        ):
            acked = sum(
                m.acknowledged - self.window.acknowledged.get(m.label, 0) for m in self.members
            )
            delivered = sum(self._delivered(m) for m in self.members)
            received = sum(m.received - self.window.received.get(m.label, 0) for m in self.members)
            parts.append(f"acknowledged {acked}, delivered {delivered}, received {received}")
        if self.step.group is not None or self.step.broker_signature is not None:
            latest = [m.latest_connection(since) for m in self.members]
            groups = Counter((s.group or "none") if s else "not connected" for s in latest)
            parts.append("groups " + _top(groups))
            if self.step.broker_signature is not None:
                schemes = Counter((s.broker_signature or "none") for s in latest if s)
                parts.append("broker signed with " + _top(schemes))
        if self.step.subscription is not None:
            parts.append("SUBACK " + _top(Counter(m.subscription or "none" for m in self.members)))
        if self.step.enrollment is not None:
            parts.append(
                "enrollment " + _top(Counter(m.enrollment or "none" for m in self.members))
            )
        if self.step.renewed_at_least is not None or self.step.renewal_failures is not None:
            renewals = [m.renewals for m in self.members]
            failed = sum(m.renewal_failures for m in self.members)
            parts.append(f"renewals per device {min(renewals)}-{max(renewals)}, {failed} failed")
        return "; ".join(parts)

    def _affected_others(self) -> tuple[list[str], int]:
        named = {m.label for m in self.members} | self.window.acted_on
        others = [
            m
            for m in self.population.members
            if m.label not in named and any(s.outcome == "connected" for s in m.sightings)
        ]
        affected = []
        for m in others:
            drops = m.drops - self.window.drops.get(m.label, 0)
            lost = m.unacknowledged(older_than=ACK_GRACE)
            if not m.connected or drops or lost:
                affected.append(
                    f"{m.label} ({m.device_id}) was affected: "
                    f"{'connected' if m.connected else 'not connected'}, {drops} drops, {lost} lost"
                )
        return affected, len(others)

    def _broker_events(self, kind: str) -> int:
        assert self.broker is not None
        ids = {m.device_id for m in self.members}
        return sum(
            1
            for e in self.broker.events
            if e["at"] >= self.window.start
            and e["event"] == kind
            and (not ids or e.get("device") in ids)
        )


def _top(counter: Counter[str], limit: int = 3) -> str:
    if not counter:
        return "nothing"
    shown = [f"{n}x {text}" for text, n in counter.most_common(limit)]
    if len(counter) > limit:
        shown.append(f"{len(counter) - limit} more")
    return ", ".join(shown)


async def await_expectation(
    checker: Checker,
    clock: Callable[[], float],
    progress: Callable[[Verdict], None] | None = None,
) -> tuple[Verdict, float]:
    """Poll until the expectation holds or ``within`` passes; returns the verdict and when.

    ``progress`` sees the verdict a few times a second while it does not hold yet.
    """
    deadline = time.monotonic() + checker.step.within
    polls = 0
    while True:
        verdict = checker.evaluate()
        if verdict.passed or time.monotonic() >= deadline:
            return verdict, clock()
        polls += 1
        if progress is not None and polls % _POLLS_PER_PROGRESS == 0:
            progress(verdict)
        await asyncio.sleep(_POLL)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n}x {outcome}" for outcome, n in sorted(counts.items()))

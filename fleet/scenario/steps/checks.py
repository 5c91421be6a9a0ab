"""Steps that only look: ``expect`` (a condition, polled until it holds or ``within`` passes)
and ``wait`` (a time, or until an expectation holds)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from device.enrollment import ENROLLMENT_FAILURES
from device.outcomes import REASONS_BY_OUTCOME
from fleet.kernel.broker_reasons import DEVICE_REASONS, BrokerEvent
from fleet.kernel.handshake_trace import SIGNATURE_SCHEMES
from fleet.kernel.lined_yaml import LinedMap, suggest
from fleet.scenario.fields import (
    Fields,
    ScenarioError,
    as_count,
    as_duration,
    as_flag,
    as_group,
    as_positive_duration,
    note_error,
    one_of,
)
from fleet.scenario.model import DEVICE_SIGHTINGS, DeviceState, Selector
from fleet.scenario.steps.base import Step, StepReader
from fleet.store.certificate_requests import ENROLLMENT_REFUSALS

if TYPE_CHECKING:
    from fleet.scenario.runner import ScenarioRun

SUBSCRIPTION_RESULTS = ("granted", "refused")
# What ``enrollment:`` may expect, compared exactly with what the device got.
ENROLLMENT_OUTCOMES = (
    "enrolled",
    *(f"refused {reason}" for reason in ENROLLMENT_REFUSALS),
    *(f"failed {reason}" for reason in ENROLLMENT_FAILURES),
)


@dataclass(frozen=True, slots=True)
class ExpectStep(Step):
    """A condition on the named devices (and the broker), polled until it holds or ``within``
    passes; counts and reasons are read since the last step that acted."""

    kind = "expect"
    fields = (
        "devices", "state", "broker", "device", "lost", "drops", "refusals",
        "delivered_at_least", "acknowledged_at_least", "received", "received_at_least",
        "subscription", "others_unaffected", "broker_event", "enrollment", "renewed_at_least",
        "renewal_failures", "group", "broker_signature", "signature", "within",
    )  # fmt: skip
    observes = True

    devices: Selector | None = None
    state: DeviceState | None = None
    broker: str | None = None  # the broker's classification (rejection or session-close reason)
    device: str | None = None  # what the device saw: one of DEVICE_SIGHTINGS
    lost: int | None = None  # at most this many QoS 1 messages unacknowledged
    drops: int | None = None  # at most this many sessions dropped per device since the last action
    refusals: int | None = None  # at most this many failed connection attempts per device
    delivered_at_least: int | None = None  # received by the witness per device since then
    acknowledged_at_least: int | None = None  # QoS 1 PUBACKs per device since the last action
    received: int | None = None  # messages received on subscriptions since the last action
    received_at_least: int | None = None
    subscription: str | None = None  # granted / refused: the latest SUBACK
    others_unaffected: bool = False
    broker_event: str | None = None
    enrollment: str | None = None  # enrolled, or the refusal / failure the latest try got
    # exact counts of those outcomes over the devices named: (("enrolled", 3), ("refused …", 2))
    enrollment_counts: tuple[tuple[str, int], ...] | None = None
    renewed_at_least: int | None = None  # renewals over MQTT per device (and in the registry)
    renewal_failures: int | None = None  # at most this many failed renewals per device
    # the key-exchange group of each device's latest connection (and the broker's record of it)
    group: str | None = None
    broker_signature: str | None = None  # the scheme the broker signed that handshake with
    signature: str | None = None  # the scheme the device signed with, as the broker logged it
    within: float = 5.0
    text: str = ""

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> ExpectStep:
        selector = reader.selector(fields)
        state = fields.get("state", one_of(DeviceState), None)
        step = ExpectStep(
            line,
            devices=selector,
            state=DeviceState(state) if state else None,
            broker=fields.get("broker", one_of(DEVICE_REASONS), None),
            device=fields.get("device", _device_sighting, None),
            lost=fields.get("lost", as_count, None),
            drops=fields.get("drops", as_count, None),
            refusals=fields.get("refusals", as_count, None),
            delivered_at_least=fields.get("delivered_at_least", as_count, None),
            acknowledged_at_least=fields.get("acknowledged_at_least", as_count, None),
            received=fields.get("received", as_count, None),
            received_at_least=fields.get("received_at_least", as_count, None),
            subscription=fields.get("subscription", one_of(SUBSCRIPTION_RESULTS), None),
            others_unaffected=fields.get("others_unaffected", as_flag, False),
            broker_event=fields.get("broker_event", one_of(BrokerEvent), None),
            enrollment=(
                None
                if isinstance(fields.mapping.get("enrollment"), LinedMap)
                else fields.get("enrollment", one_of(ENROLLMENT_OUTCOMES), None)
            ),
            enrollment_counts=_enrollment_counts(reader, fields),
            renewed_at_least=fields.get("renewed_at_least", as_count, None),
            renewal_failures=fields.get("renewal_failures", as_count, None),
            group=fields.get("group", as_group, None),
            broker_signature=fields.get("broker_signature", one_of(SIGNATURE_NAMES), None),
            signature=fields.get("signature", one_of(SIGNATURE_NAMES), None),
            within=fields.get("within", as_positive_duration, 5.0),
            text=_describe(fields),
        )
        per_device = [k for k in cls.fields if k not in _FLEET_WIDE_CHECKS]
        if selector is None and any(fields.has(k) for k in per_device):
            raise ScenarioError(
                reader.path,
                line,
                fields.where,
                "say which devices: add 'devices: GROUP or GROUP#N'",
            )
        if not any(fields.has(k) for k in (*per_device, "others_unaffected", "broker_event")):
            raise ScenarioError(
                reader.path, line, fields.where, "nothing to expect: add e.g. 'state: connected'"
            )
        return step

    async def run(self, run: ScenarioRun) -> None:
        await run.check_expectation(self, kind=self.kind)

    def expectation(self) -> ExpectStep:
        return self


SIGNATURE_NAMES = tuple(SIGNATURE_SCHEMES.values())

# Fields of 'expect' that are not a check of each named device.
_FLEET_WIDE_CHECKS = ("devices", "others_unaffected", "broker_event", "within")


def _device_sighting(value: object) -> str:
    text = str(value).strip()
    if text not in DEVICE_SIGHTINGS:
        outcomes = ", ".join(REASONS_BY_OUTCOME)
        raise ValueError(
            f"{text!r} is neither an outcome ({outcomes}) nor a reason of one, alone or as "
            f"'OUTCOME: REASON'{suggest(text, DEVICE_SIGHTINGS)}; see scenarios/README.md"
        )
    return text


def _enrollment_outcome(name: str) -> str | None:
    """The outcome ``name`` stands for: itself, or the one outcome ending in that reason."""
    if name in ENROLLMENT_OUTCOMES:
        return name
    carrying = [o for o in ENROLLMENT_OUTCOMES if o.split(" ", 1)[-1] == name]
    return carrying[0] if len(carrying) == 1 else None


def _enrollment_counts(reader: StepReader, fields: Fields) -> tuple[tuple[str, int], ...] | None:
    """``enrollment: {enrolled: 3, claim_exhausted: 2}``: an outcome, or a refusal or
    failure reason alone when only one outcome carries it, with its exact count."""
    value = fields.mapping.get("enrollment")
    if not isinstance(value, LinedMap):
        return None
    counts: dict[str, int] = {}
    for key, count in value.items():
        where = f"{fields.where}.enrollment.{key}"
        line = value.lines[key]
        outcome = _enrollment_outcome(str(key))
        if outcome is None:
            note_error(
                ScenarioError(
                    reader.path,
                    line,
                    where,
                    f"{key!r} is not an enrollment outcome or reason"
                    f"{suggest(str(key), ENROLLMENT_OUTCOMES)}",
                )
            )
            continue
        try:
            counts[outcome] = as_count(count)
        except ValueError as exc:
            note_error(ScenarioError(reader.path, line, where, str(exc)))
    return tuple(counts.items())


def _describe(fields: Fields) -> str:
    parts = []
    for key, value in fields.mapping.items():
        if key == "within":
            continue
        shown = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class WaitStep(Step):
    """Wait ``for`` a time, or ``until`` an expectation holds (at most ``timeout``)."""

    kind = "wait"
    fields = ("for", "until", "timeout")
    shorthand = "for"
    observes = True

    seconds: float | None = None
    until: ExpectStep | None = None

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> WaitStep:
        if fields.has("for") == fields.has("until"):
            raise ScenarioError(
                reader.path,
                line,
                fields.where,
                "give either 'for: DURATION' or 'until: {expectation}'",
            )
        if fields.has("for"):
            if fields.has("timeout"):
                raise fields.error("timeout", "'timeout' goes with 'until', not with 'for'")
            return WaitStep(line, seconds=fields.required("for", as_duration))
        body = fields.mapping["until"]
        if not isinstance(body, LinedMap):
            raise fields.error("until", "expected an expectation mapping (devices, state, ...)")
        until_fields = Fields(reader.path, body, f"{fields.where}.until", ExpectStep.fields)
        expectation = ExpectStep.read(reader, until_fields, fields.line("until"))
        timeout = fields.get("timeout", as_positive_duration, expectation.within)
        return WaitStep(line, until=replace(expectation, within=timeout))

    async def run(self, run: ScenarioRun) -> None:
        if self.until is not None:
            await run.check_expectation(self.until, kind="wait until")
            return
        assert self.seconds is not None
        await asyncio.sleep(self.seconds)
        run.note(self.line, self.kind, f"{self.seconds:g} s")

    def expectation(self) -> ExpectStep | None:
        return self.until

    def waits_seconds(self) -> float:
        return self.seconds or 0.0

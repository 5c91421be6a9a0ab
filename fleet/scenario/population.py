"""The devices of a scenario: who they are, what they hold, and what each of them has seen.

A member is named ``group#n`` (1-based) in scenario files; its device id comes from its
certificate. Every connection attempt and every dropped session is kept with the time it
happened (seconds on the scenario clock), so an expectation can ask what was seen since the
last action.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from device import (
    ConnectAttempt,
    ConnectOutcome,
    Device,
    DeviceBehaviour,
    DeviceSettings,
    DeviceStats,
    PahoDriver,
)
from fleet.kernel.errors import FleetError
from fleet.scenario.model import DeviceState, Group, Selector

MAX_HANDSHAKES_IN_FLIGHT = 100
_STOP_TIMEOUT = 15.0  # a device waits up to 3 s for its acks, then for its DISCONNECT to go out


@dataclass(frozen=True, slots=True)
class Sighting:
    """One thing a device saw: an attempt's outcome, or its session being dropped."""

    at: float
    outcome: str  # a ConnectOutcome value, or "dropped"
    detail: str | None
    local_address: str | None = None  # how the broker's log names the attempt (IP:PORT)
    group: str | None = None  # the key-exchange group a handshake agreed on
    broker_signature: str | None = None  # the scheme the broker signed it with

    def text(self) -> str:
        return f"{self.outcome}: {self.detail}" if self.detail else self.outcome


class DeviceCrashed(FleetError):
    """A simulated device's task raised: a defect in the simulator, never a verdict."""


@dataclass(frozen=True, slots=True)
class DeviceCrash:
    """A device task that ended with an exception: a defect, which the scenario must report."""

    label: str
    device_id: str
    at: float
    error: str  # "ValueError: ..."
    traceback: str

    def text(self) -> str:
        return f"device {self.label} ({self.device_id}) crashed at {self.at:.1f} s: {self.error}"


@dataclass
class Member:
    label: str  # sensors#3
    group: Group
    device_id: str  # the identity in its certificate
    client_id: str  # the MQTT client id it connects with
    cert: Path
    key: Path
    device: Device | None = None
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sightings: list[Sighting] = field(default_factory=list)
    subscription: str | None = None  # granted / refused: the latest SUBACK
    past: list[DeviceStats] = field(default_factory=list)  # of devices a new connect replaced
    enrollment: str | None = None  # "enrolled", "refused id_taken", "failed timeout" (latest try)
    enrollment_detail: str = ""  # what the refusal or failure said, for the report
    pins: tuple[str, ...] = ()  # the broker keys it accepts (none: any the fleet CA vouches for)

    def _stats(self) -> list[DeviceStats]:
        return [*self.past, self.device.stats] if self.device is not None else self.past

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self._stats())

    @property
    def acknowledged(self) -> int:
        return sum(s.acknowledged for s in self._stats())

    @property
    def received(self) -> int:
        return sum(s.received for s in self._stats())

    @property
    def renewals(self) -> int:
        return sum(s.renewals for s in self._stats())

    @property
    def renewal_failures(self) -> int:
        return sum(s.renewal_failures.total() for s in self._stats())

    @property
    def drops(self) -> int:
        """Sessions that ended without the device asking (planned reconnects are not drops)."""
        return sum(len(s.disconnects) for s in self._stats())

    def unacknowledged(self, *, older_than: float = 0.0) -> int:
        return self.device.unacknowledged(older_than=older_than) if self.device else 0

    @property
    def connected(self) -> bool:
        return self.device is not None and self.device.connected

    def state(self) -> DeviceState:
        if self.connected:
            return DeviceState.CONNECTED
        attempts = [s for s in self.sightings if s.outcome != "dropped"]
        if attempts and attempts[-1].outcome != ConnectOutcome.CONNECTED.value:
            return DeviceState.REJECTED
        return DeviceState.DISCONNECTED

    def sightings_since(self, start: float) -> list[Sighting]:
        return [s for s in self.sightings if s.at >= start]

    def latest_connection(self, since: float) -> Sighting | None:
        """The latest attempt since ``since`` that connected (its handshake's facts)."""
        for sighting in reversed(self.sightings):
            if sighting.at < since:
                return None
            if sighting.outcome == "connected":
                return sighting
        return None


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    server_name: str | None
    trust_anchor: Path


class Population:
    """Every member of every provisioned group, and the one paho driver they share."""

    def __init__(self, defaults: DeviceBehaviour, clock: Callable[[], float]) -> None:
        self.defaults = defaults
        self.groups: dict[str, list[Member]] = {}
        self._clock = clock
        self._driver: PahoDriver | None = None
        self._gate: asyncio.Semaphore | None = None  # caps handshakes in flight, like the swarm
        self.crashes: list[DeviceCrash] = []  # device tasks that raised, in the order they did

    def add_group(self, members: list[Member]) -> None:
        self.groups[members[0].group.name] = members

    @property
    def members(self) -> list[Member]:
        return [m for members in self.groups.values() for m in members]

    def select(self, selector: Selector) -> list[Member]:
        chosen: dict[str, Member] = {}
        for group, first, last in selector.refs:
            members = self.groups[group]
            lo = 1 if first is None else first
            hi = len(members) if last is None else last
            for member in members[lo - 1 : hi]:
                chosen[member.label] = member
        return list(chosen.values())

    # -- running devices ---------------------------------------------------------------------

    def connection_resources(self) -> tuple[PahoDriver, asyncio.Semaphore]:
        """The paho driver and the in-flight handshake cap every connection here shares."""
        if self._driver is None or self._gate is None:
            self._driver = PahoDriver()
            self._gate = asyncio.Semaphore(MAX_HANDSHAKES_IN_FLIGHT)
        return self._driver, self._gate

    def start(self, member: Member, endpoint: Endpoint, *, reconnect: bool) -> None:
        """Connect ``member`` and keep it publishing (reconnecting with backoff unless told not to)."""
        if member.task is not None and not member.task.done():
            return
        driver, gate = self.connection_resources()
        settings = DeviceSettings(
            member.device_id,
            member.cert,
            member.key,
            endpoint.trust_anchor,
            host=endpoint.host,
            port=endpoint.port,
            server_name=endpoint.server_name,
            client_id=member.client_id,
            reconnect=reconnect,
            subscribe_commands=member.group.holds_claim is None,
            renew_at=member.group.auto_renew,
            pins=member.pins,
            present_certificate=member.group.presents_certificate,
            groups=member.group.groups,
            **self.defaults.behaviour(),
        )
        member.stop = asyncio.Event()
        if member.device is not None:
            member.past.append(member.device.stats)
        member.device = Device(
            settings,
            driver,
            connect_gate=gate,
            on_attempt=lambda attempt: self._attempted(member, attempt),
            on_drop=lambda detail: member.sightings.append(
                Sighting(self._clock(), "dropped", detail)
            ),
        )
        member.task = asyncio.create_task(member.device.run(member.stop))
        member.task.add_done_callback(lambda task: self._ended(member, task))

    def _ended(self, member: Member, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        self.crashes.append(
            DeviceCrash(
                member.label,
                member.device_id,
                self._clock(),
                f"{type(exc).__name__}: {exc}",
                "".join(traceback.format_exception(exc)),
            )
        )

    def _attempted(self, member: Member, attempt: ConnectAttempt) -> None:
        member.sightings.append(
            Sighting(
                self._clock(),
                attempt.outcome.value,
                attempt.detail,
                attempt.local_address,
                attempt.group,
                attempt.broker_signature,
            )
        )

    async def stop(self, members: Iterable[Member]) -> None:
        """Disconnect cleanly (after outstanding QoS 1 acks) and wait for the devices to end.

        A device that does not end in time is cancelled; one that ended with an exception is
        in :attr:`crashes` (recorded when its task ended).
        """
        tasks = []
        for member in members:
            member.stop.set()
            if member.task is not None:
                tasks.append(member.task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)  # let them unwind, never hang on one

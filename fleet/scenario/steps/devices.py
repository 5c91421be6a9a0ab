"""Steps that make devices and drive them: provision, connect, disconnect, publish, subscribe."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleet.kernel.keys import KeyType
from fleet.kernel.lined_yaml import suggest
from fleet.scenario.credentials import DeviceFiles, broker_pin
from fleet.scenario.fields import (
    AlreadyReported,
    Fields,
    as_flag,
    as_positive_count,
    as_qos,
    as_rate,
    as_text,
)
from fleet.scenario.model import Group, Selector
from fleet.scenario.population import Member
from fleet.scenario.steps.base import Step, StepReader
from fleet.store.provisioning import ProvisionSpec, provision_devices

if TYPE_CHECKING:
    from fleet.scenario.runner import ScenarioRun


@dataclass(frozen=True, slots=True)
class ProvisionStep(Step):
    """Issue the groups' certificates (fleet-issued, rogue, cloned …)."""

    kind = "provision"
    fields = ("groups",)
    shorthand = "groups"

    groups: tuple[str, ...]

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> ProvisionStep:
        value = fields.required("groups", lambda v: v)
        groups = reader.groups
        names = list(groups) if value == "all" else (value if isinstance(value, list) else [value])
        for name in names:
            if name in reader.broken:
                raise AlreadyReported
            if name not in groups:
                raise fields.error("groups", f"no group {name!r}{suggest(str(name), groups)}")
            if not groups[name].provisioned:
                raise fields.error(
                    "groups", f"{name!r} enrolls through a claim or holds one: not provisioned"
                )
            if name in reader.provisioned:
                raise fields.error(
                    "groups",
                    f"{name!r} is already provisioned (line {reader.provisioned[name]}): "
                    "provisioning it again would replace its devices; declare another group",
                )
            original = groups[name].clone_of
            if (
                original is not None
                and original not in reader.provisioned
                and original not in names
            ):
                # a clone has no certificates of its own: its original must be provisioned
                raise fields.error("groups", f"{name!r} clones {original!r}: provision that too")
        reader.provisioned.update((str(n), line) for n in names)
        return ProvisionStep(line, tuple(str(n) for n in names))

    async def run(self, run: ScenarioRun) -> None:
        groups = [run.scenario.group(name) for name in self.groups]
        ordered = [g for g in groups if g.clone_of is None] + [g for g in groups if g.clone_of]
        for group in ordered:
            members = await _provision_group(run, group)
            run.population.add_group(members)
            issuer = "" if group.fleet_issued else f" (issuer {group.issuer}, EKU {group.eku})"
            run.note(self.line, self.kind, f"{group.name}: {group.count} devices{issuer}")


async def _provision_group(run: ScenarioRun, group: Group) -> list[Member]:
    workspace, credentials, population = run.workspace, run.credentials, run.population
    assert workspace is not None and credentials is not None
    now = dt.datetime.now(dt.UTC)
    if group.clone_of is not None:
        originals = population.groups[group.clone_of][: group.count]
        copies = await asyncio.to_thread(
            credentials.copy_identities,
            group.name,
            [DeviceFiles(o.device_id, o.cert, o.key) for o in originals],
        )  # a thief's copy: it keeps the key and certificate it stole, whatever comes later
        return [
            Member(f"{group.name}#{i + 1}", group, o.device_id, o.client_id, c.cert, c.key)
            for i, (o, c) in enumerate(zip(originals, copies, strict=True))
        ]
    pins = (broker_pin(workspace.paths.server_cert),) if group.pin_broker else ()
    if group.fleet_issued:
        spec = ProvisionSpec(
            count=group.count,
            prefix=group.name,
            tier=group.tier,
            env=group.env,
            valid_for=dt.timedelta(seconds=group.valid_for),
            not_before=now + dt.timedelta(seconds=group.starts_in),
            key_type=KeyType(group.key_type) if group.key_type else None,
        )
        # One process: for scenario-sized groups a worker pool costs more than it saves.
        result = await asyncio.to_thread(provision_devices, workspace, spec, workers=1)
        paths = workspace.paths
        files = [(i, paths.device_cert(i), paths.device_key(i)) for i in result.device_ids]
    else:
        names = None
        if group.impersonates is not None:  # the same CN and SAN as real devices
            victims = population.groups[group.impersonates][: group.count]
            names = [v.device_id for v in victims]
        issued = await asyncio.to_thread(credentials.issue_group, group, now=now, device_ids=names)
        files = [(f.device_id, f.cert, f.key) for f in issued]
    client_ids = [device_id for device_id, _, _ in files]
    if group.client_id_of is not None:
        others = population.groups[group.client_id_of]
        client_ids = [m.device_id for m in others[: group.count]]
    return [
        Member(f"{group.name}#{i + 1}", group, device_id, client_id, cert, key, pins=pins)
        for i, ((device_id, cert, key), client_id) in enumerate(zip(files, client_ids, strict=True))
    ]


@dataclass(frozen=True, slots=True)
class ConnectStep(Step):
    """Start the devices: connect, publish, reconnect with backoff (unless told not to)."""

    kind = "connect"
    fields = ("devices", "rate", "reconnect")
    shorthand = "devices"

    devices: Selector
    rate: float | None = None  # connections per second; None: all at once
    reconnect: bool = True

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> ConnectStep:
        return ConnectStep(
            line,
            reader.devices(fields),
            rate=fields.get("rate", as_rate, None),
            reconnect=fields.get("reconnect", as_flag, True),
        )

    async def run(self, run: ScenarioRun) -> None:
        members = run.population.select(self.devices)
        endpoint = run.endpoint()
        interval = 1 / self.rate if self.rate else 0.0
        started = time.monotonic()
        for index, member in enumerate(members):
            run.population.start(member, endpoint, reconnect=self.reconnect)
            if interval:
                delay = started + (index + 1) * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        rate = f" at {self.rate:g}/s" if self.rate else ""
        run.note(self.line, self.kind, f"{len(members)} devices ({self.devices.text}){rate}")


@dataclass(frozen=True, slots=True)
class DisconnectStep(Step):
    """The devices leave cleanly (after their outstanding acknowledgements)."""

    kind = "disconnect"
    fields = ("devices",)
    shorthand = "devices"

    devices: Selector

    def disrupts(self) -> Selector:
        return self.devices

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> DisconnectStep:
        return DisconnectStep(line, reader.devices(fields))

    async def run(self, run: ScenarioRun) -> None:
        members = run.population.select(self.devices)
        await run.population.stop(members)
        run.note(self.line, self.kind, f"{len(members)} devices ({self.devices.text})")


@dataclass(frozen=True, slots=True)
class PublishStep(Step):
    """Connected devices publish ``count`` messages each on ``topic``."""

    kind = "publish"
    fields = ("devices", "topic", "count", "qos")

    devices: Selector
    topic: str  # "{id}" is replaced by each device's id
    count: int = 1
    qos: int = 1

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> PublishStep:
        return PublishStep(
            line,
            reader.devices(fields),
            topic=fields.required("topic", as_text),
            count=fields.get("count", as_positive_count, 1),
            qos=fields.get("qos", as_qos, 1),
        )

    async def run(self, run: ScenarioRun) -> None:
        sent = 0
        for member in run.population.select(self.devices):
            if member.device is None or not member.connected:
                continue
            topic = self.topic.replace("{id}", member.device_id)
            for seq in range(self.count):
                member.device.publish(topic, f'{{"seq": {seq}}}'.encode(), qos=self.qos)
                sent += 1
        run.note(self.line, self.kind, f"{sent} messages to {self.topic} ({self.devices.text})")


@dataclass(frozen=True, slots=True)
class SubscribeStep(Step):
    """Connected devices subscribe; each keeps its SUBACK (granted or refused)."""

    kind = "subscribe"
    fields = ("devices", "topic", "qos")

    devices: Selector
    topic: str
    qos: int = 1

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> SubscribeStep:
        return SubscribeStep(
            line,
            reader.devices(fields),
            topic=fields.required("topic", as_text),
            qos=fields.get("qos", as_qos, 1),
        )

    async def run(self, run: ScenarioRun) -> None:
        results = Counter[str]()
        for member in run.population.select(self.devices):
            if member.device is None or not member.connected:
                member.subscription = "not connected"
            else:
                try:
                    granted = await member.device.subscribe(self.topic, qos=self.qos)
                    member.subscription = "granted" if granted else "refused"
                except (ConnectionError, TimeoutError) as exc:
                    member.subscription = f"failed ({exc or 'no SUBACK'})"
            results[member.subscription] += 1
        shown = ", ".join(f"{n}x {r}" for r, n in results.items())
        run.note(self.line, self.kind, f"{self.topic} ({self.devices.text}): {shown}")

"""Steps of zero-touch enrollment: create a claim, enroll devices through it, revoke it."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from device.enrollment import ClaimBundle, EnrollmentResult, enroll
from fleet.kernel.identity import ENVIRONMENTS, TIERS
from fleet.kernel.tls import DeviceTls
from fleet.scenario.fields import (
    Fields,
    as_group_name,
    as_positive_count,
    as_positive_duration,
    as_text,
    one_of,
)
from fleet.scenario.model import Selector
from fleet.scenario.population import Member
from fleet.scenario.steps.base import Step, StepReader
from fleet.store.claims import ClaimRules, create_claim, revoke_claim

if TYPE_CHECKING:
    from fleet.scenario.runner import ScenarioRun


@dataclass(frozen=True, slots=True)
class CreateClaimStep(Step):
    """A claim (a batch certificate a factory flashes) that devices enroll through."""

    kind = "create_claim"
    fields = ("name", "max_uses", "allow_ids", "valid_for", "tier", "env", "device_valid_for")

    name: str
    max_uses: int = 1000
    allow_ids: str = "*"
    valid_for: float = 86400.0
    tier: str = "bronze"
    env: str = "prod"
    device_valid_for: float = 3600.0

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> CreateClaimStep:
        return CreateClaimStep(
            line,
            name=fields.required("name", as_group_name),
            max_uses=fields.get("max_uses", as_positive_count, 1000),
            allow_ids=fields.get("allow_ids", as_text, "*"),
            valid_for=fields.get("valid_for", as_positive_duration, 86400.0),
            tier=fields.get("tier", one_of(TIERS), "bronze"),
            env=fields.get("env", one_of(ENVIRONMENTS), "prod"),
            device_valid_for=fields.get("device_valid_for", as_positive_duration, 3600.0),
        )

    async def run(self, run: ScenarioRun) -> None:
        assert run.workspace is not None
        rules = ClaimRules(
            name=self.name,
            max_uses=self.max_uses,
            valid_for=dt.timedelta(seconds=self.valid_for),
            allow_ids=self.allow_ids,
            tier=self.tier,
            env=self.env,
            device_valid_for=dt.timedelta(seconds=self.device_valid_for),
        )
        await asyncio.to_thread(create_claim, run.workspace, rules)
        run.note(
            self.line,
            self.kind,
            f"{self.name}: {self.max_uses} uses, ids {self.allow_ids!r}, {self.tier} {self.env}",
        )


@dataclass(frozen=True, slots=True)
class EnrollStep(Step):
    """The members enroll through their group's claim (``enroll_with``)."""

    kind = "enroll"
    fields = ("devices",)
    shorthand = "devices"

    devices: Selector

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> EnrollStep:
        selector = reader.devices(fields)
        for group_name, _, _ in selector.refs:
            if reader.groups[group_name].enroll_with is None:
                raise fields.error(
                    "devices", f"group {group_name!r} has no 'enroll_with: CLAIM' to enroll with"
                )
        return EnrollStep(line, selector)

    async def run(self, run: ScenarioRun) -> None:
        workspace = run.workspace
        assert workspace is not None
        members = run.population.select(self.devices)
        endpoint = run.endpoint()
        driver, gate = run.population.connection_resources()
        store = workspace.paths.devices_dir
        claims: dict[str, tuple[ClaimBundle, DeviceTls]] = {}
        for name in {m.group.enroll_with for m in members if m.group.enroll_with}:
            bundle = ClaimBundle(workspace.paths.claim_dir(name))
            claims[name] = (bundle, await asyncio.to_thread(bundle.context))

        async def enroll_member(member: Member) -> EnrollmentResult:
            assert member.group.enroll_with is not None
            bundle, context = claims[member.group.enroll_with]
            return await enroll(
                member.device_id, bundle, store, host=endpoint.host, port=endpoint.port,
                server_name=endpoint.server_name, hardware_serial=f"HW-{member.label}",
                driver=driver, context=context, connect_gate=gate,
            )  # fmt: skip

        started = run.clock()
        results = await asyncio.gather(*(enroll_member(m) for m in members))
        for member, result in zip(members, results, strict=True):
            member.enrollment, member.enrollment_detail = result.outcome, result.detail
        seconds = run.clock() - started
        outcomes = Counter(r.outcome for r in results)
        shown = ", ".join(f"{n}x {o}" for o, n in outcomes.most_common())
        run.note(
            self.line, self.kind, f"{len(members)} devices ({self.devices.text}) in "
            f"{seconds:.1f} s: {shown}",
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class RevokeClaimStep(Step):
    """No more enrollments through the claim; its certificate goes on the CRL."""

    kind = "revoke_claim"
    fields = ("name",)
    shorthand = "name"

    name: str

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> RevokeClaimStep:
        return RevokeClaimStep(line, name=fields.required("name", as_group_name))

    async def run(self, run: ScenarioRun) -> None:
        assert run.workspace is not None
        changed = await asyncio.to_thread(revoke_claim, run.workspace, self.name)
        run.note(self.line, self.kind, f"{self.name} revoked" if changed else "already revoked")

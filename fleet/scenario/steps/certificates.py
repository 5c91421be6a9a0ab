"""Steps on devices' certificates: revoke, rotate (renew) and replace."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleet.kernel.errors import UsageError
from fleet.scenario.fields import Fields, as_flag, as_positive_duration
from fleet.scenario.model import Selector
from fleet.scenario.steps.base import Step, StepReader
from fleet.store.renewal import renew_device
from fleet.store.replacement import replace_device
from fleet.store.revocation import revoke_devices, revoke_superseded

if TYPE_CHECKING:
    from fleet.scenario.runner import ScenarioRun


@dataclass(frozen=True, slots=True)
class RevokeStep(Step):
    """Revoke the devices (one command, one CRL), or only the certificates a rotation replaced."""

    kind = "revoke"
    fields = ("devices", "superseded_only")
    shorthand = "devices"

    devices: Selector
    superseded_only: bool = False  # only the certificates a rotation replaced

    def disrupts(self) -> Selector:
        return self.devices

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> RevokeStep:
        selector = reader.devices(fields)
        superseded_only = fields.get("superseded_only", as_flag, False)
        if not superseded_only:
            for member in reader.members(selector):
                reader.revoked.setdefault(member, line)
        return RevokeStep(line, selector, superseded_only=superseded_only)

    async def run(self, run: ScenarioRun) -> None:
        workspace = run.workspace
        assert workspace is not None
        members = run.population.select(self.devices)
        for member in members:
            if not member.group.fleet_issued:
                raise UsageError(
                    f"{run.scenario.path}:{self.line}: revoke: {member.label} holds a certificate "
                    "the fleet did not issue; only fleet devices can be revoked"
                )
        if not self.superseded_only:  # one command, one CRL, however many devices
            ids = [m.device_id for m in members]
            results = await asyncio.to_thread(revoke_devices, workspace, ids)
            serials = sum(len(r.revoked_serials) for r in results)
            numbers = {r.crl_number for r in results if r.crl_number is not None}
            run.note(
                self.line,
                self.kind,
                f"{len(members)} device(s) ({self.devices.text}): {serials} certificate(s), "
                f"CRL #{', #'.join(map(str, sorted(numbers))) or '-'}",
            )
            return
        for member in members:
            result = await asyncio.to_thread(revoke_superseded, workspace, member.device_id)
            run.note(
                self.line,
                self.kind,
                f"superseded certificates of {member.label} ({member.device_id}): "
                f"{len(result.revoked_serials)} certificate(s), CRL #{result.crl_number}",
            )


@dataclass(frozen=True, slots=True)
class RotateStep(Step):
    """Renew the devices' certificates (same key); live sessions move to them."""

    kind = "rotate"
    fields = ("devices", "valid_for", "reconnect")
    shorthand = "devices"

    devices: Selector
    valid_for: float | None = None
    reconnect: bool = True  # move live sessions to the new certificate (drain acks first)

    def disrupts(self) -> Selector:
        return self.devices

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> RotateStep:
        selector = reader.devices(fields)
        for group_name, number in reader.members(selector):
            revoked_at = reader.revoked.get((group_name, number))
            if revoked_at is not None:
                raise fields.error(
                    "devices",
                    f"{group_name}#{number} is revoked (line {revoked_at}): a revoked device "
                    "cannot renew; rotate before revoking, or give it a new certificate "
                    "with 'replace'",
                )
        return RotateStep(
            line,
            selector,
            valid_for=fields.get("valid_for", as_positive_duration, None),
            reconnect=fields.get("reconnect", as_flag, True),
        )

    async def run(self, run: ScenarioRun) -> None:
        workspace = run.workspace
        assert workspace is not None
        members = run.population.select(self.devices)
        valid_for = dt.timedelta(seconds=self.valid_for) if self.valid_for else None

        def renew_all() -> None:
            for member in members:
                renew_device(workspace, member.device_id, valid_for=valid_for)

        await asyncio.to_thread(renew_all)
        for member in members:
            if member.device is not None:
                member.device.swap_certificate(member.cert, member.key)
        if self.reconnect:
            await asyncio.gather(
                *(m.device.reconnect_gracefully() for m in members if m.device is not None)
            )
        moved = " and moved their sessions to them" if self.reconnect else ""
        run.note(self.line, self.kind, f"renewed {len(members)} certificates{moved}")


@dataclass(frozen=True, slots=True)
class ReplaceStep(Step):
    """Revoked devices get a new key and certificate under the same id (fleet provision
    --replace); their running simulators use the new pair from their next handshake."""

    kind = "replace"
    fields = ("devices", "valid_for")
    shorthand = "devices"

    devices: Selector
    valid_for: float | None = None

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> ReplaceStep:
        selector = reader.devices(fields)
        for group_name, number in reader.members(selector):
            if not reader.groups[group_name].fleet_issued:
                raise fields.error(
                    "devices", f"{group_name!r} is not issued by the fleet: nothing to replace"
                )
            if (group_name, number) not in reader.revoked:
                raise fields.error(
                    "devices",
                    f"{group_name}#{number} is not revoked: only a revoked device is replaced "
                    "(add a 'revoke' step before)",
                )
        for member in reader.members(selector):
            del reader.revoked[member]
        return ReplaceStep(
            line, selector, valid_for=fields.get("valid_for", as_positive_duration, None)
        )

    async def run(self, run: ScenarioRun) -> None:
        workspace = run.workspace
        assert workspace is not None
        members = run.population.select(self.devices)
        valid_for = dt.timedelta(seconds=self.valid_for) if self.valid_for else None

        def replace_all() -> None:
            for member in members:
                replace_device(workspace, member.device_id, valid_for=valid_for)

        await asyncio.to_thread(replace_all)
        for member in members:
            if member.device is not None:  # its next handshake uses the new pair
                member.device.swap_certificate(member.cert, member.key)
        run.note(self.line, self.kind, f"new keys and certificates for {len(members)} devices")

"""Steps on how revocation reaches the broker: CRLs published (fresh or about to go stale) and
the control plane that serves them going away and coming back."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleet.kernel.errors import UsageError
from fleet.scenario.fields import Fields, as_positive_duration
from fleet.scenario.steps.base import Step, StepReader
from fleet.store.revocation import publish_crl

if TYPE_CHECKING:
    from fleet.scenario.runner import ScenarioRun


@dataclass(frozen=True, slots=True)
class StaleCrlStep(Step):
    """Publish a CRL whose nextUpdate is ``after`` from now (stale once that has passed)."""

    kind = "stale_crl"
    fields = ("after",)
    shorthand = "after"

    after: float

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> StaleCrlStep:
        return StaleCrlStep(line, after=fields.required("after", as_positive_duration))

    async def run(self, run: ScenarioRun) -> None:
        assert run.workspace is not None
        crl = await asyncio.to_thread(
            publish_crl, run.workspace, valid_for=dt.timedelta(seconds=self.after)
        )
        stale_at = crl.next_update_utc
        run.note(self.line, self.kind, f"published a CRL whose nextUpdate is {stale_at:%H:%M:%S}")


@dataclass(frozen=True, slots=True)
class PublishCrlStep(Step):
    """Publish a fresh CRL."""

    kind = "publish_crl"

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> PublishCrlStep:
        return PublishCrlStep(line)

    async def run(self, run: ScenarioRun) -> None:
        assert run.workspace is not None
        await asyncio.to_thread(publish_crl, run.workspace)
        run.note(self.line, self.kind, "published a fresh CRL")


@dataclass(frozen=True, slots=True)
class StopControlPlaneStep(Step):
    """The control plane (fleet serve) goes away: no CRL, no OCSP, no refresh."""

    kind = "stop_control_plane"

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> StopControlPlaneStep:
        return StopControlPlaneStep(line)

    async def run(self, run: ScenarioRun) -> None:
        plane = run.control_plane
        if plane is None:
            raise UsageError(
                f"{run.scenario.path}:{self.line}: stop_control_plane: no control plane runs "
                "(set broker.crl_from: control-plane)"
            )
        run.control_plane = None
        await asyncio.to_thread(plane.stop)
        run.note(self.line, self.kind, f"{plane.url} is down")
        run.control_plane_port = plane.port


@dataclass(frozen=True, slots=True)
class StartControlPlaneStep(Step):
    """The control plane comes back (on the same port)."""

    kind = "start_control_plane"

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> StartControlPlaneStep:
        return StartControlPlaneStep(line)

    async def run(self, run: ScenarioRun) -> None:
        await run.start_control_plane(port=run.control_plane_port)

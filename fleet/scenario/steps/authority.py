"""Steps on the issuing CA: rotate it, retire the old one, revoke it (a compromised key)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleet.scenario.fields import Fields
from fleet.scenario.steps.base import Step, StepReader
from fleet.store.ca_rotation import retire_previous_issuers, revoke_issuing_cas, rotate_issuing_ca

if TYPE_CHECKING:
    from fleet.scenario.runner import ScenarioRun


@dataclass(frozen=True, slots=True)
class RotateCaStep(Step):
    """A new issuing intermediate signs from now on; the old one stays trusted."""

    kind = "rotate_ca"

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> RotateCaStep:
        return RotateCaStep(line)

    async def run(self, run: ScenarioRun) -> None:
        assert run.workspace is not None
        cert = await asyncio.to_thread(rotate_issuing_ca, run.workspace)
        run.note(self.line, self.kind, f"new issuing CA {cert.subject.rfc4514_string()}")
        if run.witness is not None:  # it must outlive the retirement of the old issuer
            await run.witness.reissue(run.endpoint())


@dataclass(frozen=True, slots=True)
class RetireCaStep(Step):
    """Stop trusting the issuing intermediates a rotation replaced."""

    kind = "retire_ca"

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> RetireCaStep:
        return RetireCaStep(line)

    async def run(self, run: ScenarioRun) -> None:
        assert run.workspace is not None
        retired = await asyncio.to_thread(retire_previous_issuers, run.workspace)
        run.note(self.line, self.kind, f"retired {', '.join(retired) or 'nothing'}")


@dataclass(frozen=True, slots=True)
class RevokeIssuingCaStep(Step):
    """Revoke the issuing intermediates a rotation replaced, in the root's CRL (compromised)."""

    kind = "revoke_issuing_ca"

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> RevokeIssuingCaStep:
        return RevokeIssuingCaStep(line)

    async def run(self, run: ScenarioRun) -> None:
        assert run.workspace is not None
        revoked = await asyncio.to_thread(revoke_issuing_cas, run.workspace)
        run.note(self.line, self.kind, f"revoked in the root's CRL: {', '.join(revoked)}")

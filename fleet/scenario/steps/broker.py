"""Steps on the embedded broker itself (none can run against --target): restart it, stop and
start it, change the certificate it presents."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.kernel.errors import FleetError
from fleet.kernel.files import replace_atomically
from fleet.kernel.identity import ENVIRONMENTS
from fleet.scenario.broker_process import BrokerOptions, EmbeddedBroker
from fleet.scenario.fields import Fields, as_duration, as_flag, one_of, policy_file
from fleet.scenario.model import REVOCATION_POLICIES, BrokerCertificate
from fleet.scenario.steps.base import Step, StepReader

if TYPE_CHECKING:
    from fleet.scenario.runner import ScenarioRun


def _broker(run: ScenarioRun) -> EmbeddedBroker:
    assert run.broker is not None  # embedded_only: never run against --target
    return run.broker


@dataclass(frozen=True, slots=True)
class RestartBrokerStep(Step):
    """Stop the broker, stay down ``down_for``, start it again (with other options if given)."""

    kind = "restart_broker"
    fields = ("env", "revocation_policy", "clear_env", "down_for")
    embedded_only = True

    env: str | None = None
    revocation_policy: str | None = None
    clear_env: bool = False
    down_for: float = 0.0

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> RestartBrokerStep:
        return RestartBrokerStep(
            line,
            env=fields.get("env", one_of(ENVIRONMENTS), None),
            revocation_policy=fields.get("revocation_policy", one_of(REVOCATION_POLICIES), None),
            clear_env=fields.get("clear_env", as_flag, False),
            down_for=fields.get("down_for", as_duration, 0.0),
        )

    async def run(self, run: ScenarioRun) -> None:
        broker = _broker(run)
        options = broker.options
        if self.clear_env:
            options = replace(options, env=None)
        if self.env is not None:
            options = replace(options, env=self.env)
        if self.revocation_policy is not None:
            options = replace(options, revocation_policy=self.revocation_policy)
        await broker.restart(options, down_for=self.down_for)
        run.note(self.line, self.kind, f"restarted ({_describe(options)})")


def _describe(options: BrokerOptions) -> str:
    env = f"env {options.env}" if options.env else "any env"
    return f"{env}, {options.revocation_policy}"


@dataclass(frozen=True, slots=True)
class BrokerCertificateStep(Step):
    """The broker restarts presenting another certificate (rogue, expired, wrong name …)."""

    kind = "broker_certificate"
    fields = ("certificate",)
    shorthand = "certificate"
    embedded_only = True

    certificate: BrokerCertificate

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> BrokerCertificateStep:
        kind = fields.required("certificate", one_of(BrokerCertificate))
        return BrokerCertificateStep(line, BrokerCertificate(kind))

    async def run(self, run: ScenarioRun) -> None:
        broker = _broker(run)
        assert run.credentials is not None
        await asyncio.to_thread(run.credentials.install_broker_certificate, self.certificate)
        await broker.restart(broker.options)
        run.note(self.line, self.kind, f"broker now presents: {self.certificate}")


@dataclass(frozen=True, slots=True)
class StopBrokerStep(Step):
    """The embedded broker goes down (its devices lose their sessions) until ``start_broker``."""

    kind = "stop_broker"
    embedded_only = True

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> StopBrokerStep:
        return StopBrokerStep(line)

    async def run(self, run: ScenarioRun) -> None:
        broker = _broker(run)
        await broker.stop()
        broker.log.lines.append((run.clock(), "broker stopped by the scenario"))
        run.note(self.line, self.kind, "the embedded broker is down")


@dataclass(frozen=True, slots=True)
class StartBrokerStep(Step):
    """The embedded broker comes back on the same port, reading the workspace as it is now."""

    kind = "start_broker"
    embedded_only = True

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> StartBrokerStep:
        return StartBrokerStep(line)

    async def run(self, run: ScenarioRun) -> None:
        broker = _broker(run)
        await broker.start()
        run.note(self.line, self.kind, f"up again on mqtts://127.0.0.1:{broker.port}")


_POLICY_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class PolicyStep(Step):
    """The embedded broker's access policy becomes ``file`` (read live, no restart): live
    sessions lose what it no longer grants. Needs ``broker.policy``."""

    kind = "policy"
    fields = ("file",)
    shorthand = "file"
    embedded_only = True

    file: Path

    @classmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> PolicyStep:
        return PolicyStep(line, fields.required("file", lambda v: policy_file(reader.path, v)))

    async def run(self, run: ScenarioRun) -> None:
        broker = _broker(run)
        target = broker.options.policy
        assert target is not None  # the loader wants broker.policy with this step
        seen = len(broker.log.events)
        await asyncio.to_thread(replace_atomically, target, self.file.read_bytes())
        deadline = run.clock() + _POLICY_WAIT
        while run.clock() < deadline:
            for event in broker.log.events[seen:]:
                if event.get("event") == "policy_installed":
                    run.note(self.line, self.kind, f"{self.file.name}: {event.get('detail')}")
                    return
                if event.get("event") == "policy_rejected":
                    raise FleetError(f"the broker refused {self.file}: {event.get('detail')}")
            await asyncio.sleep(0.05)  # the broker's log, another process: polled
        raise FleetError(f"the broker did not take {self.file} within {_POLICY_WAIT:g} s")

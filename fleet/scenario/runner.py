"""Replaying a scenario for real: a fresh workspace, real certificates, a real broker, real devices.

Each step runs in order; the timeline records when (milliseconds since the scenario began)
and what it did. ``expect`` and ``wait until`` poll until their condition holds or their
deadline passes, and record what was observed; a failure keeps the evidence (broker events and
log lines, device sightings) from around it. The run goes on after a failed expectation, so one
report shows every expectation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import shutil
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import replace
from pathlib import Path

from cryptography import x509

from device.enrollment import ClaimBundle
from device.requests import new_request_id
from fleet.controlplane.server import ControlPlane
from fleet.kernel.config import FleetConfig
from fleet.kernel.errors import FleetError, UsageError
from fleet.kernel.files import replace_atomically
from fleet.kernel.keys import KeyType, key_type_of
from fleet.kernel.mqtt_api import enroll_client_id
from fleet.scenario.broker_process import BrokerLog, BrokerOptions, EmbeddedBroker
from fleet.scenario.credentials import ScenarioCredentials
from fleet.scenario.expectations import Checker, Verdict, Window, await_expectation
from fleet.scenario.model import Group, Scenario
from fleet.scenario.population import DeviceCrashed, Endpoint, Member, Population
from fleet.scenario.results import (
    ExpectationResult,
    Listener,
    ScenarioResult,
    Target,
    TimelineEntry,
)
from fleet.scenario.steps import ExpectStep
from fleet.scenario.witness import Witness
from fleet.store.workspace import Workspace, WorkspacePaths, init_workspace

_EVIDENCE_LINES = 12


def skip_reason(scenario: Scenario, target: Target | None) -> str | None:
    """Why ``scenario`` cannot run against ``target`` (None: it can)."""
    if target is None:
        return None
    if scenario.broker.needs_fleet_broker:
        return f"needs the mtls-fleet broker: {scenario.broker.needs_fleet_broker}"
    if scenario.broker.policy is not None:
        return "needs the mtls-fleet broker: its access policy (broker.policy)"
    for name in ("groups", "key_type"):
        if getattr(scenario.broker, name):
            return f"needs the mtls-fleet broker: its {name.replace('_', ' ')} (broker.{name})"
    if scenario.ca_key_type is not None:
        return (
            f"needs a fresh workspace whose CAs have {scenario.ca_key_type} keys (ca_key_type); "
            "the target trusts the workspace in --dir"
        )
    for step in scenario.steps:
        if step.embedded_only:
            return f"line {step.line}: '{step.kind}' acts on the embedded broker itself"
        expectation = step.expectation()
        if expectation is not None and not _observable_on_any_broker(expectation):
            return (
                f"line {step.line}: the expectation checks only what our broker logs "
                "(broker, broker_event), which another broker does not show"
            )
    return None


def _key_type(name: str | None) -> KeyType | None:
    return KeyType(name) if name else None


def _check_key_types(scenario: Scenario, workspace: Workspace) -> None:
    """A workspace from --dir must have the CA and broker keys the scenario declares."""
    broker_cert = x509.load_pem_x509_certificate(workspace.paths.server_cert.read_bytes())
    wanted = (
        ("ca_key_type", scenario.ca_key_type, workspace.ca.issuing_key),
        ("broker.key_type", scenario.broker.key_type, broker_cert.public_key()),
    )
    for field, name, key in wanted:
        if name is None:
            continue
        have = key_type_of(key).value
        if have != name:
            raise UsageError(
                f"{scenario.path}: {field} is {name}, but the workspace in --dir has {have} "
                "keys: run the scenario without --dir (a fresh workspace is made for it)"
            )


def _counts_deliveries(scenario: Scenario) -> bool:
    for step in scenario.steps:
        expectation = step.expectation()
        if expectation is not None and expectation.delivered_at_least is not None:
            return True
    return False


_BROKER_SIDE = frozenset({"broker", "broker_event", "signature"})
_NOT_CHECKS = frozenset({"line", "devices", "within", "text"})


def _observable_on_any_broker(step: ExpectStep) -> bool:
    """Whether ``step`` checks something the devices themselves see (nothing observed is
    never a pass: an expectation of broker-side evidence alone cannot hold elsewhere)."""
    for each in dataclasses.fields(step):
        if each.name in _BROKER_SIDE or each.name in _NOT_CHECKS:
            continue
        value = getattr(step, each.name)
        if value is not None and value is not False:
            return True
    return False


class ScenarioRun:
    """One run of one scenario. ``await run()`` returns its :class:`ScenarioResult`."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        target: Target | None = None,
        workspace_dir: Path | None = None,
        keep_workspace: bool = False,
        listener: Listener | None = None,
    ) -> None:
        self.scenario = scenario
        self.target = target
        self.keep_workspace = keep_workspace or workspace_dir is not None
        self._workspace_dir = workspace_dir
        self._temporary: Path | None = None  # a directory this run made and removes
        self._disrupted: set[str] = set()  # members named by revoke, rotate or disconnect
        self.control_plane_port = 0  # where a stopped control plane comes back
        self._listener = listener or (lambda kind, item: None)
        self._started = time.monotonic()
        self.result = ScenarioResult(scenario.name, str(scenario.path), "passed")
        self.population = Population(scenario.devices, self.clock)
        self.broker: EmbeddedBroker | None = None
        self.workspace: Workspace | None = None
        self.credentials: ScenarioCredentials | None = None
        self.control_plane: ControlPlane | None = None
        self.window = Window(0.0)
        self.witness: Witness | None = None  # started when an expectation counts deliveries

    def clock(self) -> float:
        """Seconds since the scenario began."""
        return time.monotonic() - self._started

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> ScenarioResult:
        reason = skip_reason(self.scenario, self.target)
        if reason is not None:
            self.result.status, self.result.reason = "skipped", reason
            return self.result
        random.seed(self.scenario.seed)
        self._started = time.monotonic()
        try:
            await asyncio.wait_for(self._run_steps(), self.scenario.timeout)
        except TimeoutError:
            self._error(f"did not finish within its timeout of {self.scenario.timeout:g} s")
        except FleetError as exc:
            self._error(str(exc))
        except Exception as exc:  # a defect: report it for this scenario, run the others
            self.result.traceback = traceback.format_exc()
            self._error(
                f"internal error {type(exc).__name__}: {exc} (traceback in the JSON report)"
            )
        finally:
            await self._tear_down()
        if self.result.status == "passed" and self.population.crashes:
            try:  # a device that raised while being stopped
                self._raise_on_crash()
            except DeviceCrashed as exc:
                self._error(str(exc))
        self.result.seconds = self.clock()
        if self.result.status == "passed" and not all(e.passed for e in self.result.expectations):
            failed = sum(not e.passed for e in self.result.expectations)
            self.result.status, self.result.reason = "failed", f"{failed} expectation(s) failed"
        return self.result

    def _error(self, reason: str) -> None:
        self.result.status, self.result.reason = "error", reason
        self.note(0, "error", reason)

    async def _run_steps(self) -> None:
        await self._set_up()
        for step in self.scenario.steps:
            disrupted = step.disrupts()
            if disrupted is not None:
                self._disrupted.update(m.label for m in self.population.select(disrupted))
            if not step.observes:
                self.window = Window.open(
                    self.clock(), self.population, self._disrupted, self.witness
                )
            await step.run(self)
            self._raise_on_crash()

    def _raise_on_crash(self) -> None:
        """A device task that raised is a defect: the scenario errors, naming it."""
        if self.population.crashes:
            crash = self.population.crashes[0]
            self.result.traceback = crash.traceback
            more = len(self.population.crashes) - 1
            also = f" (and {more} more)" if more else ""
            raise DeviceCrashed(f"{crash.text()}{also} (traceback in the JSON report)")

    async def _set_up(self) -> None:
        directory = self._workspace_dir
        if directory is None:
            parent = Path(tempfile.mkdtemp(prefix=f"fleet-scenario-{self.scenario.name}-"))
            self._temporary = parent
            directory = parent / "fleet"
        if not WorkspacePaths(directory).config.exists():
            config = FleetConfig(
                ca_key_type=_key_type(self.scenario.ca_key_type),
                broker_key_type=_key_type(self.scenario.broker.key_type),
            )
            if self.scenario.crl_valid_for is not None:
                config = replace(
                    config, crl_valid_for=dt.timedelta(seconds=self.scenario.crl_valid_for)
                )
            await asyncio.to_thread(init_workspace, directory, config=config)
        self.workspace = Workspace.open(directory)
        _check_key_types(self.scenario, self.workspace)
        self.result.workspace = str(directory)
        run_dir = f"scenario/{self.scenario.name}-{int(time.time() * 1000)}"
        self.credentials = ScenarioCredentials(self.workspace, directory / run_dir)
        crl_url = None
        if self.scenario.broker.crl_from == "control-plane":
            await self.start_control_plane(port=0)
            assert self.control_plane is not None
            crl_url = f"{self.control_plane.url}/crl.pem"
        if self.target is None:
            policy = None
            if self.scenario.broker.policy is not None:  # a copy the policy steps replace
                policy = self.credentials.root / "policy.yaml"
                policy.parent.mkdir(parents=True, exist_ok=True)
                replace_atomically(policy, self.scenario.broker.policy.read_bytes())
            options = BrokerOptions(
                env=self.scenario.broker.env,
                revocation_policy=self.scenario.broker.revocation_policy,
                crl_url=crl_url,
                policy=policy,
                groups=self.scenario.broker.groups,
            )
            self.broker = EmbeddedBroker(directory, options, clock=self.clock)
            await self.broker.start()
            self.note(0, "broker", f"embedded broker on mqtts://127.0.0.1:{self.broker.port}")
        else:
            self.note(0, "broker", f"target mqtts://{self.target.host}:{self.target.port}")
        for group in self.scenario.groups:
            if not group.provisioned:
                self.population.add_group(self._unprovisioned_members(group))
        if self.scenario.certificate_requests:
            await self.start_control_plane(port=0)
        if _counts_deliveries(self.scenario):
            self.witness = Witness(self.workspace, self.population, self.scenario.broker.env)
            await self.witness.start(self.endpoint())
            self.note(0, "witness", f"{self.witness.device_id} subscribed to devices/+/telemetry")

    def _unprovisioned_members(self, group: Group) -> list[Member]:
        """Members that enroll (their files appear at the enroll step) or hold a claim."""
        assert self.workspace is not None
        paths = self.workspace.paths
        members = []
        for n in range(1, group.count + 1):
            label = f"{group.name}#{n}"
            if group.holds_claim is not None:
                claim = ClaimBundle(paths.claim_dir(group.holds_claim))
                client_id = enroll_client_id(new_request_id())
                members.append(
                    Member(label, group, group.holds_claim, client_id, claim.cert, claim.key)
                )
            else:
                device_id = f"{group.name}-{n:05d}"
                cert, key = paths.device_cert(device_id), paths.device_key(device_id)
                members.append(Member(label, group, device_id, device_id, cert, key))
        return members

    async def start_control_plane(self, *, port: int) -> None:
        """Start 'fleet serve' (HTTP: CRL, OCSP); once the broker runs, and if the scenario asks,
        it also answers enrollment and renewal requests over MQTT."""
        assert self.workspace is not None
        if self.control_plane is None:
            plane = ControlPlane(self.workspace, port=port, crl_check_every=0.25)
            await asyncio.to_thread(plane.start)
            self.control_plane = plane
            self.note(0, "control_plane", f"fleet serve on {plane.url} (CRL and OCSP)")
        plane = self.control_plane
        broker_up = self.target is not None or self.broker is not None
        if self.scenario.certificate_requests and broker_up and plane.service is None:
            endpoint = self.endpoint()
            await asyncio.to_thread(plane.answer_requests, endpoint.host, endpoint.port)
            self.note(0, "control_plane", "answering enrollment and renewal requests over MQTT")

    async def _tear_down(self) -> None:
        if self.witness is not None:
            await self.witness.stop()
        if self.control_plane is not None:
            await asyncio.to_thread(self.control_plane.stop)
        await self.population.stop(self.population.members)
        self._count_messages()
        self._connection_curve()
        if self.broker is not None:
            await self.broker.stop()
        if self._temporary is not None and not self.keep_workspace:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self.result.workspace = None

    def endpoint(self) -> Endpoint:
        assert self.workspace is not None
        if self.target is not None:
            return Endpoint(
                self.target.host,
                self.target.port,
                self.target.server_name,
                self.workspace.paths.root_cert,
            )
        assert self.broker is not None
        return Endpoint("127.0.0.1", self.broker.port, "localhost", self.workspace.paths.root_cert)

    # -- reporting helpers -------------------------------------------------------------------

    def note(self, line: int, kind: str, text: str) -> None:
        entry = TimelineEntry(int(self.clock() * 1000), line, kind, text)
        self.result.timeline.append(entry)
        self._listener("step", entry)

    def _count_messages(self) -> None:
        for group, members in self.population.groups.items():
            if all(m.device is None for m in members):
                continue  # never connected
            self.result.messages[group] = {
                "sent": sum(m.sent for m in members),
                "acknowledged": sum(m.acknowledged for m in members),
                "unacknowledged": sum(m.unacknowledged() for m in members),
                "connections": sum(
                    1 for m in members for s in m.sightings if s.outcome == "connected"
                ),
                "drops": sum(m.drops for m in members),
            }

    def _connection_curve(self) -> None:
        seconds = Counter(
            int(s.at)
            for m in self.population.members
            for s in m.sightings
            if s.outcome == "connected"
        )
        if seconds:
            self.result.connections_per_second = [
                seconds.get(i, 0) for i in range(max(seconds) + 1)
            ]

    def _evidence(self, members: list[Member], since: float) -> list[str]:
        """Broker events and log lines and device sightings around a failure."""
        lines: list[str] = []
        ids = {m.device_id for m in members}
        if self.broker is not None:
            log: BrokerLog = self.broker.log
            events = [
                e
                for e in log.events
                if e["at"] >= since - 1 and (not ids or e.get("device") in ids or "device" not in e)
            ]
            for e in events[-_EVIDENCE_LINES:]:
                fields = " ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "ts"))
                lines.append(f"{int(e['at'] * 1000)} ms broker event: {fields}")
            for at, text in [x for x in log.lines if x[0] >= since - 1][-4:]:
                lines.append(f"{int(at * 1000)} ms broker log: {text}")
        for m in members[:5]:
            for s in m.sightings[-3:]:
                lines.append(f"{int(s.at * 1000)} ms {m.label} ({m.device_id}) saw {s.text()}")
        return lines

    # -- expectations ------------------------------------------------------------------

    async def check_expectation(self, step: ExpectStep, *, kind: str) -> None:
        """Poll ``step`` until it holds or its time is up; record the verdict and evidence."""
        checker = Checker(
            step,
            self.population,
            self.broker.log if self.broker else None,
            self.window,
            self._certificates_of,
            self.witness,
        )

        def progress(verdict: Verdict) -> None:
            waited = self.clock() - started
            self._listener(
                "status",
                f"line {step.line}: {kind} {step.text} ({waited:.1f}/{step.within:g} s): "
                f"{verdict.observed}",
            )

        started = self.clock()
        verdict, at = await await_expectation(checker, self.clock, progress)
        self._listener("status", None)
        result = ExpectationResult(
            line=step.line,
            kind=kind,
            text=step.text,
            passed=verdict.passed,
            observed=verdict.observed,
            at_ms=int(at * 1000),
            failures=verdict.failures[:20]
            + (
                [f"... and {len(verdict.failures) - 20} more"] if len(verdict.failures) > 20 else []
            ),
            unchecked=verdict.unchecked,
        )
        if not verdict.passed:
            at_fault = {f.split(" ", 1)[0] for f in verdict.failures}
            failing = [m for m in self.population.members if m.label in at_fault]
            result.evidence = self._evidence(failing or verdict.devices, self.window.start)
        self.result.expectations.append(result)
        self._listener("expectation", result)

    def _certificates_of(self, device_id: str) -> int:
        assert self.workspace is not None
        return len(self.workspace.registry.certificate_history(device_id))

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from device.enrollment import ClaimBundle, EnrollmentResult, enroll
from device.requests import new_request_id
from fleet.controlplane.server import ControlPlane
from fleet.kernel.config import FleetConfig
from fleet.kernel.errors import FleetError, UsageError
from fleet.kernel.mqtt_api import enroll_client_id
from fleet.kernel.tls import DeviceTls
from fleet.scenario.broker_process import BrokerLog, BrokerOptions, EmbeddedBroker
from fleet.scenario.credentials import DeviceFiles, ScenarioCredentials, broker_pin
from fleet.scenario.expectations import Checker, Verdict, Window, await_expectation
from fleet.scenario.model import (
    BrokerCertificateStep,
    ConnectStep,
    CreateClaimStep,
    DisconnectStep,
    EnrollStep,
    ExpectStep,
    Group,
    ProvisionStep,
    PublishCrlStep,
    PublishStep,
    ReplaceStep,
    RestartBrokerStep,
    RetireCaStep,
    RevokeClaimStep,
    RevokeIssuingCaStep,
    RevokeStep,
    RotateCaStep,
    RotateStep,
    Scenario,
    StaleCrlStep,
    StartBrokerStep,
    StartControlPlaneStep,
    Step,
    StopBrokerStep,
    StopControlPlaneStep,
    SubscribeStep,
    WaitStep,
)
from fleet.scenario.population import DeviceCrashed, Endpoint, Member, Population
from fleet.scenario.witness import Witness
from fleet.store.ca_rotation import retire_previous_issuers, revoke_issuing_cas, rotate_issuing_ca
from fleet.store.claims import ClaimRules, create_claim, revoke_claim
from fleet.store.provisioning import ProvisionSpec, provision_devices
from fleet.store.renewal import renew_device
from fleet.store.replacement import replace_device
from fleet.store.revocation import publish_crl, revoke_devices, revoke_superseded
from fleet.store.workspace import Workspace, WorkspacePaths, init_workspace

# Steps that act on the embedded broker itself: against --target they cannot run.
_EMBEDDED_ONLY = (RestartBrokerStep, BrokerCertificateStep, StopBrokerStep, StartBrokerStep)
_EVIDENCE_LINES = 12
# Steps whose devices are expected to be affected: "others_unaffected" leaves them out.
_DISRUPTIVE = (RevokeStep, RotateStep, DisconnectStep)


@dataclass(frozen=True, slots=True)
class Target:
    """A broker that is not ours to start: ``--target mqtts://HOST:PORT``."""

    host: str
    port: int
    server_name: str | None = "localhost"


@dataclass
class TimelineEntry:
    at_ms: int
    line: int
    kind: str
    text: str


@dataclass
class ExpectationResult:
    line: int
    kind: str
    text: str
    passed: bool
    observed: str
    at_ms: int
    failures: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)


@dataclass
class ScenarioResult:
    name: str
    path: str
    status: str  # passed, failed, skipped, error
    reason: str = ""
    seconds: float = 0.0
    timeline: list[TimelineEntry] = field(default_factory=list)
    expectations: list[ExpectationResult] = field(default_factory=list)
    messages: dict[str, dict[str, int]] = field(default_factory=dict)  # per group
    connections_per_second: list[int] = field(default_factory=list)
    workspace: str | None = None
    traceback: str | None = None  # when the run itself failed (a defect, not a verdict)

    @property
    def passed(self) -> bool:
        return self.status in ("passed", "skipped")


# ("step", TimelineEntry), ("expectation", ExpectationResult), ("status", text or None: cleared)
Listener = Callable[[str, object], None]


def skip_reason(scenario: Scenario, target: Target | None) -> str | None:
    """Why ``scenario`` cannot run against ``target`` (None: it can)."""
    if target is None:
        return None
    if scenario.broker.needs_fleet_broker:
        return f"needs the mtls-fleet broker: {scenario.broker.needs_fleet_broker}"
    for step in scenario.steps:
        if isinstance(step, _EMBEDDED_ONLY):
            return f"line {step.line}: '{step.kind}' acts on the embedded broker itself"
        expectation = step.until if isinstance(step, WaitStep) else step
        if isinstance(expectation, ExpectStep) and not _observable_on_any_broker(expectation):
            return (
                f"line {step.line}: the expectation checks only what our broker logs "
                "(broker, broker_event), which another broker does not show"
            )
    return None


def _counts_deliveries(scenario: Scenario) -> bool:
    for step in scenario.steps:
        expectation = step.until if isinstance(step, WaitStep) else step
        if isinstance(expectation, ExpectStep) and expectation.delivered_at_least is not None:
            return True
    return False


_BROKER_SIDE = frozenset({"broker", "broker_event"})
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
        self._control_plane_port = 0
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
        self._note(0, "error", reason)

    async def _run_steps(self) -> None:
        await self._set_up()
        for step in self.scenario.steps:
            if isinstance(step, _DISRUPTIVE):
                self._disrupted.update(m.label for m in self.population.select(step.devices))
            if not isinstance(step, ExpectStep | WaitStep):
                self.window = Window.open(
                    self.clock(), self.population, self._disrupted, self.witness
                )
            await self._run_step(step)
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
            config = FleetConfig()
            if self.scenario.crl_valid_for is not None:
                config = replace(
                    config, crl_valid_for=dt.timedelta(seconds=self.scenario.crl_valid_for)
                )
            await asyncio.to_thread(init_workspace, directory, config=config)
        self.workspace = Workspace.open(directory)
        self.result.workspace = str(directory)
        run_dir = f"scenario/{self.scenario.name}-{int(time.time() * 1000)}"
        self.credentials = ScenarioCredentials(self.workspace, directory / run_dir)
        crl_url = None
        if self.scenario.broker.crl_from == "control-plane":
            await self._start_control_plane(port=0)
            assert self.control_plane is not None
            crl_url = f"{self.control_plane.url}/crl.pem"
        if self.target is None:
            options = BrokerOptions(
                env=self.scenario.broker.env,
                revocation_policy=self.scenario.broker.revocation_policy,
                crl_url=crl_url,
            )
            self.broker = EmbeddedBroker(directory, options, clock=self.clock)
            await self.broker.start()
            self._note(0, "broker", f"embedded broker on mqtts://127.0.0.1:{self.broker.port}")
        else:
            self._note(0, "broker", f"target mqtts://{self.target.host}:{self.target.port}")
        for group in self.scenario.groups:
            if not group.provisioned:
                self.population.add_group(self._unprovisioned_members(group))
        if self.scenario.certificate_requests:
            await self._start_control_plane(port=0)
        if _counts_deliveries(self.scenario):
            self.witness = Witness(self.workspace, self.population, self.scenario.broker.env)
            await self.witness.start(self.endpoint())
            self._note(0, "witness", f"{self.witness.device_id} subscribed to devices/+/telemetry")

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

    async def _start_control_plane(self, *, port: int) -> None:
        """Start 'fleet serve' (HTTP: CRL, OCSP); once the broker runs, and if the scenario asks,
        it also answers enrollment and renewal requests over MQTT."""
        assert self.workspace is not None
        if self.control_plane is None:
            plane = ControlPlane(self.workspace, port=port, crl_check_every=0.25)
            await asyncio.to_thread(plane.start)
            self.control_plane = plane
            self._note(0, "control_plane", f"fleet serve on {plane.url} (CRL and OCSP)")
        plane = self.control_plane
        broker_up = self.target is not None or self.broker is not None
        if self.scenario.certificate_requests and broker_up and plane.service is None:
            endpoint = self.endpoint()
            await asyncio.to_thread(plane.answer_requests, endpoint.host, endpoint.port)
            self._note(0, "control_plane", "answering enrollment and renewal requests over MQTT")

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

    def _note(self, line: int, kind: str, text: str) -> None:
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

    # -- steps -------------------------------------------------------------------------------

    async def _run_step(self, step: Step) -> None:
        handler = getattr(self, f"_step_{step.kind}")
        await handler(step)

    async def _step_provision(self, step: ProvisionStep) -> None:
        groups = [self.scenario.group(name) for name in step.groups]
        ordered = [g for g in groups if g.clone_of is None] + [g for g in groups if g.clone_of]
        for group in ordered:
            members = await self._provision_group(group)
            self.population.add_group(members)
            issuer = "" if group.fleet_issued else f" (issuer {group.issuer}, EKU {group.eku})"
            self._note(step.line, "provision", f"{group.name}: {group.count} devices{issuer}")

    async def _provision_group(self, group: Group) -> list[Member]:
        assert self.workspace is not None and self.credentials is not None
        now = dt.datetime.now(dt.UTC)
        if group.clone_of is not None:
            originals = self.population.groups[group.clone_of][: group.count]
            copies = await asyncio.to_thread(
                self.credentials.copy_identities,
                group.name,
                [DeviceFiles(o.device_id, o.cert, o.key) for o in originals],
            )  # a thief's copy: it keeps the key and certificate it stole, whatever comes later
            return [
                Member(f"{group.name}#{i + 1}", group, o.device_id, o.client_id, c.cert, c.key)
                for i, (o, c) in enumerate(zip(originals, copies, strict=True))
            ]
        pins = (broker_pin(self.workspace.paths.server_cert),) if group.pin_broker else ()
        if group.fleet_issued:
            spec = ProvisionSpec(
                count=group.count,
                prefix=group.name,
                tier=group.tier,
                env=group.env,
                valid_for=dt.timedelta(seconds=group.valid_for),
                not_before=now + dt.timedelta(seconds=group.starts_in),
            )
            # One process: for scenario-sized groups a worker pool costs more than it saves.
            result = await asyncio.to_thread(provision_devices, self.workspace, spec, workers=1)
            paths = self.workspace.paths
            files = [(i, paths.device_cert(i), paths.device_key(i)) for i in result.device_ids]
        else:
            names = None
            if group.impersonates is not None:  # the same CN and SAN as real devices
                victims = self.population.groups[group.impersonates][: group.count]
                names = [v.device_id for v in victims]
            issued = await asyncio.to_thread(
                self.credentials.issue_group, group, now=now, device_ids=names
            )
            files = [(f.device_id, f.cert, f.key) for f in issued]
        client_ids = [device_id for device_id, _, _ in files]
        if group.client_id_of is not None:
            others = self.population.groups[group.client_id_of]
            client_ids = [m.device_id for m in others[: group.count]]
        return [
            Member(f"{group.name}#{i + 1}", group, device_id, client_id, cert, key, pins=pins)
            for i, ((device_id, cert, key), client_id) in enumerate(
                zip(files, client_ids, strict=True)
            )
        ]

    async def _step_connect(self, step: ConnectStep) -> None:
        members = self.population.select(step.devices)
        endpoint = self.endpoint()
        interval = 1 / step.rate if step.rate else 0.0
        started = time.monotonic()
        for index, member in enumerate(members):
            self.population.start(member, endpoint, reconnect=step.reconnect)
            if interval:
                delay = started + (index + 1) * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        rate = f" at {step.rate:g}/s" if step.rate else ""
        self._note(step.line, "connect", f"{len(members)} devices ({step.devices.text}){rate}")

    async def _step_disconnect(self, step: DisconnectStep) -> None:
        members = self.population.select(step.devices)
        await self.population.stop(members)
        self._note(step.line, "disconnect", f"{len(members)} devices ({step.devices.text})")

    async def _step_publish(self, step: PublishStep) -> None:
        members = self.population.select(step.devices)
        sent = 0
        for member in members:
            if member.device is None or not member.connected:
                continue
            topic = step.topic.replace("{id}", member.device_id)
            for seq in range(step.count):
                member.device.publish(topic, f'{{"seq": {seq}}}'.encode(), qos=step.qos)
                sent += 1
        self._note(step.line, "publish", f"{sent} messages to {step.topic} ({step.devices.text})")

    async def _step_subscribe(self, step: SubscribeStep) -> None:
        members = self.population.select(step.devices)
        results = Counter[str]()
        for member in members:
            if member.device is None or not member.connected:
                member.subscription = "not connected"
            else:
                try:
                    granted = await member.device.subscribe(step.topic, qos=step.qos)
                    member.subscription = "granted" if granted else "refused"
                except (ConnectionError, TimeoutError) as exc:
                    member.subscription = f"failed ({exc or 'no SUBACK'})"
            results[member.subscription] += 1
        shown = ", ".join(f"{n}x {r}" for r, n in results.items())
        self._note(step.line, "subscribe", f"{step.topic} ({step.devices.text}): {shown}")

    async def _step_revoke(self, step: RevokeStep) -> None:
        assert self.workspace is not None
        members = self.population.select(step.devices)
        for member in members:
            if not member.group.fleet_issued:
                raise UsageError(
                    f"{self.scenario.path}:{step.line}: revoke: {member.label} holds a certificate "
                    "the fleet did not issue; only fleet devices can be revoked"
                )
        if not step.superseded_only:  # one command, one CRL, however many devices
            ids = [m.device_id for m in members]
            results = await asyncio.to_thread(revoke_devices, self.workspace, ids)
            serials = sum(len(r.revoked_serials) for r in results)
            numbers = {r.crl_number for r in results if r.crl_number is not None}
            self._note(
                step.line,
                "revoke",
                f"{len(members)} device(s) ({step.devices.text}): {serials} certificate(s), "
                f"CRL #{', #'.join(map(str, sorted(numbers))) or '-'}",
            )
            return
        for member in members:
            result = await asyncio.to_thread(revoke_superseded, self.workspace, member.device_id)
            self._note(
                step.line,
                "revoke",
                f"superseded certificates of {member.label} ({member.device_id}): "
                f"{len(result.revoked_serials)} certificate(s), CRL #{result.crl_number}",
            )

    async def _step_rotate(self, step: RotateStep) -> None:
        assert self.workspace is not None
        members = self.population.select(step.devices)
        valid_for = dt.timedelta(seconds=step.valid_for) if step.valid_for else None
        workspace = self.workspace

        def renew_all() -> None:
            for member in members:
                renew_device(workspace, member.device_id, valid_for=valid_for)

        await asyncio.to_thread(renew_all)
        for member in members:
            if member.device is not None:
                member.device.swap_certificate(member.cert, member.key)
        if step.reconnect:
            await asyncio.gather(
                *(m.device.reconnect_gracefully() for m in members if m.device is not None)
            )
        moved = " and moved their sessions to them" if step.reconnect else ""
        self._note(step.line, "rotate", f"renewed {len(members)} certificates{moved}")

    async def _step_replace(self, step: ReplaceStep) -> None:
        assert self.workspace is not None
        members = self.population.select(step.devices)
        valid_for = dt.timedelta(seconds=step.valid_for) if step.valid_for else None
        workspace = self.workspace

        def replace_all() -> None:
            for member in members:
                replace_device(workspace, member.device_id, valid_for=valid_for)

        await asyncio.to_thread(replace_all)
        for member in members:
            if member.device is not None:  # its next handshake uses the new pair
                member.device.swap_certificate(member.cert, member.key)
        self._note(step.line, "replace", f"new keys and certificates for {len(members)} devices")

    async def _step_restart_broker(self, step: RestartBrokerStep) -> None:
        assert self.broker is not None
        options = self.broker.options
        if step.clear_env:
            options = replace(options, env=None)
        if step.env is not None:
            options = replace(options, env=step.env)
        if step.revocation_policy is not None:
            options = replace(options, revocation_policy=step.revocation_policy)
        await self.broker.restart(options, down_for=step.down_for)
        self._note(step.line, "restart_broker", f"restarted ({_describe(options)})")

    async def _step_stop_broker(self, step: StopBrokerStep) -> None:
        assert self.broker is not None
        await self.broker.stop()
        self.broker.log.lines.append((self.clock(), "broker stopped by the scenario"))
        self._note(step.line, "stop_broker", "the embedded broker is down")

    async def _step_start_broker(self, step: StartBrokerStep) -> None:
        assert self.broker is not None
        await self.broker.start()
        self._note(step.line, "start_broker", f"up again on mqtts://127.0.0.1:{self.broker.port}")

    async def _step_broker_certificate(self, step: BrokerCertificateStep) -> None:
        assert self.broker is not None and self.credentials is not None
        await asyncio.to_thread(self.credentials.install_broker_certificate, step.certificate)
        await self.broker.restart(self.broker.options)
        self._note(step.line, "broker_certificate", f"broker now presents: {step.certificate}")

    async def _step_stale_crl(self, step: StaleCrlStep) -> None:
        assert self.workspace is not None
        crl = await asyncio.to_thread(
            publish_crl, self.workspace, valid_for=dt.timedelta(seconds=step.after)
        )
        stale_at = crl.next_update_utc
        self._note(
            step.line, "stale_crl", f"published a CRL whose nextUpdate is {stale_at:%H:%M:%S}"
        )

    async def _step_publish_crl(self, step: PublishCrlStep) -> None:
        assert self.workspace is not None
        await asyncio.to_thread(publish_crl, self.workspace)
        self._note(step.line, "publish_crl", "published a fresh CRL")

    async def _step_stop_control_plane(self, step: StopControlPlaneStep) -> None:
        if self.control_plane is None:
            raise UsageError(
                f"{self.scenario.path}:{step.line}: stop_control_plane: no control plane runs "
                "(set broker.crl_from: control-plane)"
            )
        plane, self.control_plane = self.control_plane, None
        await asyncio.to_thread(plane.stop)
        self._note(step.line, "stop_control_plane", f"{plane.url} is down")
        self._control_plane_port = plane.port

    async def _step_start_control_plane(self, step: StartControlPlaneStep) -> None:
        await self._start_control_plane(port=self._control_plane_port)

    async def _step_create_claim(self, step: CreateClaimStep) -> None:
        assert self.workspace is not None
        rules = ClaimRules(
            name=step.name,
            max_uses=step.max_uses,
            valid_for=dt.timedelta(seconds=step.valid_for),
            allow_ids=step.allow_ids,
            tier=step.tier,
            env=step.env,
            device_valid_for=dt.timedelta(seconds=step.device_valid_for),
        )
        await asyncio.to_thread(create_claim, self.workspace, rules)
        self._note(
            step.line,
            "create_claim",
            f"{step.name}: {step.max_uses} uses, ids {step.allow_ids!r}, {step.tier} {step.env}",
        )

    async def _step_enroll(self, step: EnrollStep) -> None:
        assert self.workspace is not None
        members = self.population.select(step.devices)
        endpoint = self.endpoint()
        driver, gate = self.population.connection_resources()
        store = self.workspace.paths.devices_dir
        claims: dict[str, tuple[ClaimBundle, DeviceTls]] = {}
        for name in {m.group.enroll_with for m in members if m.group.enroll_with}:
            bundle = ClaimBundle(self.workspace.paths.claim_dir(name))
            claims[name] = (bundle, await asyncio.to_thread(bundle.context))

        async def enroll_member(member: Member) -> EnrollmentResult:
            assert member.group.enroll_with is not None
            bundle, context = claims[member.group.enroll_with]
            return await enroll(
                member.device_id, bundle, store, host=endpoint.host, port=endpoint.port,
                server_name=endpoint.server_name, hardware_serial=f"HW-{member.label}",
                driver=driver, context=context, connect_gate=gate,
            )  # fmt: skip

        started = self.clock()
        results = await asyncio.gather(*(enroll_member(m) for m in members))
        for member, result in zip(members, results, strict=True):
            member.enrollment, member.enrollment_detail = result.outcome, result.detail
        seconds = self.clock() - started
        outcomes = Counter(r.outcome for r in results)
        shown = ", ".join(f"{n}x {o}" for o, n in outcomes.most_common())
        self._note(
            step.line, "enroll", f"{len(members)} devices ({step.devices.text}) in "
            f"{seconds:.1f} s: {shown}",
        )  # fmt: skip

    async def _step_revoke_claim(self, step: RevokeClaimStep) -> None:
        assert self.workspace is not None
        changed = await asyncio.to_thread(revoke_claim, self.workspace, step.name)
        self._note(
            step.line, "revoke_claim", f"{step.name} revoked" if changed else "already revoked"
        )

    async def _step_rotate_ca(self, step: RotateCaStep) -> None:
        assert self.workspace is not None
        cert = await asyncio.to_thread(rotate_issuing_ca, self.workspace)
        self._note(step.line, "rotate_ca", f"new issuing CA {cert.subject.rfc4514_string()}")
        if self.witness is not None:  # it must outlive the retirement of the old issuer
            await self.witness.reissue(self.endpoint())

    async def _step_revoke_issuing_ca(self, step: RevokeIssuingCaStep) -> None:
        assert self.workspace is not None
        revoked = await asyncio.to_thread(revoke_issuing_cas, self.workspace)
        self._note(
            step.line, "revoke_issuing_ca", f"revoked in the root's CRL: {', '.join(revoked)}"
        )

    async def _step_retire_ca(self, step: RetireCaStep) -> None:
        assert self.workspace is not None
        retired = await asyncio.to_thread(retire_previous_issuers, self.workspace)
        self._note(step.line, "retire_ca", f"retired {', '.join(retired) or 'nothing'}")

    async def _step_expect(self, step: ExpectStep, *, kind: str = "expect") -> None:
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

    async def _step_wait(self, step: WaitStep) -> None:
        if step.until is not None:
            await self._step_expect(step.until, kind="wait until")
            return
        assert step.seconds is not None
        await asyncio.sleep(step.seconds)
        self._note(step.line, "wait", f"{step.seconds:g} s")


def _describe(options: BrokerOptions) -> str:
    env = f"env {options.env}" if options.env else "any env"
    return f"{env}, {options.revocation_policy}"

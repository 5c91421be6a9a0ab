"""Reading a scenario file: YAML with line numbers, checked field by field before anything runs.

Every error names the file, the line and the field, and suggests the nearest valid name when a
step or field is misspelt::

    scenarios/revoke-one.yaml:14: steps[3].expect: unknown field 'stat' (did you mean 'state'?)

Every error of a file is reported at once: a field that cannot be read is noted and reading goes
on (with the field's default, or without the group or step it belongs to). This module reads the
scenario, its groups and defaults; each step is read by its own class (:mod:`.steps`), with the
field helpers of :mod:`.fields`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from device.settings import DeviceBehaviour
from fleet.kernel.errors import UsageError
from fleet.kernel.identity import ENVIRONMENTS, TIERS
from fleet.kernel.keys import KeyType
from fleet.kernel.lined_yaml import LinedMap, suggest
from fleet.scenario.fields import (
    Fields,
    ScenarioError,
    ScenarioErrors,
    as_count,
    as_flag,
    as_fraction,
    as_group_name,
    as_groups,
    as_positive_count,
    as_positive_duration,
    as_qos,
    as_sequence,
    as_signed_duration,
    as_text,
    collecting_errors,
    note_error,
    one_of,
    one_or_all,
    parse_yaml,
    policy_file,
    reading_on,
)
from fleet.scenario.model import (
    CRL_SOURCES,
    REVOCATION_POLICIES,
    SCENARIO_DEVICES,
    BrokerSpec,
    Eku,
    Group,
    Issuer,
    Scenario,
)
from fleet.scenario.steps import PolicyStep, Step, StepReader

# -- the scenario ------------------------------------------------------------------------------

_TOP_FIELDS = (
    "name",
    "description",
    "seed",
    "timeout",
    "crl_valid_for",
    "certificate_requests",
    "ca_key_type",
    "tags",
    "broker",
    "devices",
    "fleet",
    "steps",
)
_GROUP_FIELDS = (
    "name",
    "count",
    "tier",
    "env",
    "valid_for",
    "starts_in",
    "issuer",
    "eku",
    "clone_of",
    "client_id_of",
    "enroll_with",
    "holds_claim",
    "auto_renew",
    "impersonates",
    "pin_broker",
    "presents_certificate",
    "key_type",
    "groups",
)


def load_scenario(path: Path) -> Scenario:
    """Read and check ``path``; raise :class:`ScenarioError` naming file, line and field (a
    :class:`ScenarioErrors` holding every error, when there are several)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the scenario ({exc.strerror})") from None
    document = parse_yaml(path, text)
    with collecting_errors() as errors:
        try:
            scenario = _scenario(path, document)
        except ScenarioError as error:
            errors.append(error)
    if errors:
        raise one_or_all(errors)
    return scenario


def _scenario(path: Path, document: LinedMap) -> Scenario:
    top = Fields(path, document, "scenario", _TOP_FIELDS)
    name = ""
    with reading_on():
        name = top.required("name", as_text)
    groups, broken = _groups(path, top)
    group_names = {g.name: g for g in groups}
    steps = _steps(path, top, group_names, broken)
    broker = _broker(path, top)
    for step in steps:
        if isinstance(step, PolicyStep) and broker.policy is None:
            note_error(
                ScenarioError(
                    path, step.line, "policy", "a policy step needs 'broker: {policy: FILE}'"
                )
            )
    requests = top.get("certificate_requests", as_flag, False)
    for group in groups:
        if (group.enroll_with or group.auto_renew) and not requests:
            note_error(
                ScenarioError(
                    path,
                    group.line,
                    f"fleet group {group.name!r}",
                    "enrollment and auto_renew need the control plane: "
                    "add 'certificate_requests: true'",
                )
            )
    return Scenario(
        name=name,
        description=top.get("description", as_text, ""),
        path=path,
        seed=top.get("seed", as_count, 0),
        groups=groups,
        broker=broker,
        devices=_device_defaults(path, top),
        steps=steps,
        timeout=top.get("timeout", as_positive_duration, 120.0),
        crl_valid_for=top.get("crl_valid_for", as_positive_duration, None),
        certificate_requests=requests,
        ca_key_type=top.get("ca_key_type", one_of(KeyType), None),
        tags=tuple(top.get("tags", lambda v: [as_text(t) for t in as_sequence(v)], [])),
    )


def _mapping(path: Path, parent: Fields, key: str) -> LinedMap | None:
    value = parent.mapping.get(key)
    if value is None:
        return None
    if not isinstance(value, LinedMap):
        raise parent.error(key, "expected a mapping of fields")
    return value


def _broker(path: Path, top: Fields) -> BrokerSpec:
    mapping = _mapping(path, top, "broker")
    if mapping is None:
        return BrokerSpec()
    fields = Fields(
        path,
        mapping,
        "broker",
        ("env", "revocation_policy", "needs_fleet_broker", "crl_from", "policy", "groups",
         "key_type"),
    )  # fmt: skip
    return BrokerSpec(
        env=fields.get("env", one_of(ENVIRONMENTS), None),
        revocation_policy=fields.get(
            "revocation_policy", one_of(REVOCATION_POLICIES), "fail-closed"
        ),
        needs_fleet_broker=fields.get("needs_fleet_broker", as_text, None),
        crl_from=fields.get("crl_from", one_of(CRL_SOURCES), "file"),
        policy=fields.get("policy", lambda value: policy_file(path, value), None),
        groups=fields.get("groups", as_groups, ()),
        key_type=fields.get("key_type", one_of(KeyType), None),
    )


def _device_defaults(path: Path, top: Fields) -> DeviceBehaviour:
    mapping = _mapping(path, top, "devices")
    if mapping is None:
        return SCENARIO_DEVICES
    allowed = (
        "publish_every",
        "qos",
        "payload_size",
        "backoff_base",
        "backoff_cap",
        "connect_timeout",
    )
    fields = Fields(path, mapping, "devices", allowed)
    d = SCENARIO_DEVICES
    return replace(
        d,
        publish_every=fields.get("publish_every", as_positive_duration, d.publish_every),
        qos=fields.get("qos", as_qos, d.qos),
        payload_size=fields.get("payload_size", as_count, d.payload_size),
        backoff_base=fields.get("backoff_base", as_positive_duration, d.backoff_base),
        backoff_cap=fields.get("backoff_cap", as_positive_duration, d.backoff_cap),
        connect_timeout=fields.get("connect_timeout", as_positive_duration, d.connect_timeout),
    )


def _groups(path: Path, top: Fields) -> tuple[tuple[Group, ...], set[str]]:
    """The fleet's groups, and the names of those that could not be read (so that the steps
    naming them are not reported as naming an unknown group too)."""
    raw = top.required("fleet", as_sequence)
    if not raw:
        raise top.error("fleet", "declare at least one device group")
    groups: dict[str, Group] = {}
    broken: set[str] = set()
    for index, item in enumerate(raw):
        where = f"fleet[{index}]"
        if not isinstance(item, LinedMap):
            note_error(
                ScenarioError(
                    path, raw.lines[index], where, "a group is a mapping (name, count, ...)"
                )
            )
            continue
        name = item.get("name")
        with reading_on():
            groups_before = len(groups)
            _group(path, item, where, groups)
        if len(groups) == groups_before and isinstance(name, str):
            broken.add(name.strip())
    return tuple(groups.values()), broken


def _group(path: Path, item: LinedMap, where: str, groups: dict[str, Group]) -> None:
    """Read one group into ``groups``, or raise its first error."""
    fields = Fields(path, item, where, _GROUP_FIELDS)
    name = fields.required("name", as_group_name)
    if name in groups:
        raise fields.error("name", f"group {name!r} is declared twice")
    group = Group(
        name=name,
        count=fields.required("count", as_positive_count),
        line=item.line,
        tier=fields.get("tier", one_of(TIERS), "bronze"),
        env=fields.get("env", one_of(ENVIRONMENTS), "prod"),
        valid_for=fields.get("valid_for", as_positive_duration, 3600.0),
        starts_in=fields.get("starts_in", as_signed_duration, 0.0),
        issuer=Issuer(fields.get("issuer", one_of(Issuer), Issuer.FLEET.value)),
        eku=Eku(fields.get("eku", one_of(Eku), Eku.CLIENT_AUTH.value)),
        clone_of=fields.get("clone_of", as_text, None),
        client_id_of=fields.get("client_id_of", as_text, None),
        enroll_with=fields.get("enroll_with", as_group_name, None),
        holds_claim=fields.get("holds_claim", as_group_name, None),
        auto_renew=fields.get("auto_renew", as_fraction, None),
        impersonates=fields.get("impersonates", as_text, None),
        pin_broker=fields.get("pin_broker", as_flag, False),
        presents_certificate=fields.get("presents_certificate", as_flag, True),
        key_type=fields.get("key_type", one_of(KeyType), None),
        groups=fields.get("groups", as_groups, ()),
    )
    if group.impersonates is not None and group.issuer is Issuer.FLEET:
        raise fields.error(
            "impersonates",
            "the fleet never issues a second certificate for a device id: give the impostors "
            "another issuer (issuer: rogue-ca)",
        )
    if group.enroll_with and group.holds_claim:
        raise fields.error("holds_claim", "a group either enrolls or holds the claim, not both")
    borrowed = (
        ("clone_of", group.clone_of),
        ("client_id_of", group.client_id_of),
        ("impersonates", group.impersonates),
    )
    for key, other in borrowed:
        if other is None:
            continue
        if other not in groups:
            raise fields.error(
                key, f"no group {other!r} declared before this one{suggest(other, groups)}"
            )
        if groups[other].count < group.count:
            raise fields.error(key, f"group {other!r} has fewer than {group.count} devices")
    groups[name] = group


def _steps(path: Path, top: Fields, groups: dict[str, Group], broken: set[str]) -> tuple[Step, ...]:
    raw = top.required("steps", as_sequence)
    if not raw:
        raise top.error("steps", "a scenario needs at least one step")
    reader = StepReader(path, groups, broken)
    steps = []
    for i, item in enumerate(raw):
        with reading_on():
            steps.append(reader.read(item, raw.lines[i], f"steps[{i}]"))
    return tuple(steps)


def load_scenarios(paths: Iterable[Path]) -> list[Scenario]:
    """Load every file (directories: their ``*.yaml``), all checked before any runs."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.glob("*.yaml")))
        else:
            files.append(path)
    if not files:
        raise UsageError("no scenario files given (or the directory holds no *.yaml)")
    scenarios, errors = [], []
    for file in files:
        try:
            scenarios.append(load_scenario(file))
        except ScenarioErrors as several:
            errors.extend(several.errors)
        except ScenarioError as error:
            errors.append(error)
    if errors:
        raise one_or_all(errors)
    return scenarios

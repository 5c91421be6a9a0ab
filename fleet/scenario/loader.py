"""Reading a scenario file: YAML with line numbers, checked field by field before anything runs.

Every error names the file, the line and the field, and suggests the nearest valid name when a
step or field is misspelt::

    scenarios/revoke-one.yaml:14: steps[3].expect: unknown field 'stat' (did you mean 'state'?)

Every error of a file is reported at once: a field that cannot be read is noted and reading goes
on (with the field's default, or without the group or step it belongs to).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from device.enrollment import ENROLLMENT_FAILURES
from device.outcomes import REASONS_BY_OUTCOME
from fleet.kernel.broker_reasons import DEVICE_REASONS, BrokerEvent
from fleet.kernel.durations import parse_duration
from fleet.kernel.errors import UsageError
from fleet.kernel.identity import ENVIRONMENTS, TIERS, validate_device_id
from fleet.scenario.model import (
    DEVICE_SIGHTINGS,
    STEP_KINDS,
    BrokerCertificate,
    BrokerCertificateStep,
    BrokerSpec,
    ConnectStep,
    CreateClaimStep,
    DeviceDefaults,
    DeviceState,
    DisconnectStep,
    Eku,
    EnrollStep,
    ExpectStep,
    Group,
    Issuer,
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
    Selector,
    StaleCrlStep,
    StartBrokerStep,
    StartControlPlaneStep,
    Step,
    StopBrokerStep,
    StopControlPlaneStep,
    SubscribeStep,
    WaitStep,
)
from fleet.store.certificate_requests import ENROLLMENT_REFUSALS

T = TypeVar("T")

REVOCATION_POLICIES = ("fail-closed", "fail-open")
SUBSCRIPTION_RESULTS = ("granted", "refused")
CRL_SOURCES = ("file", "control-plane")
_SELECTOR = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:#(\d+)(?:-(\d+))?)?$")


class ScenarioError(UsageError):
    """A scenario file that cannot run as written; the message says where and why."""

    def __init__(self, path: Path, line: int, where: str, problem: str) -> None:
        self.path = path
        self.line = line
        self.where = where
        super().__init__(f"{path}:{line}: {where}: {problem}")


class ScenarioErrors(ScenarioError):
    """Several errors, of one file or several, all reported at once (in file and line order);
    ``path``, ``line`` and ``where`` are the first one's."""

    def __init__(self, errors: Iterable[ScenarioError]) -> None:
        self.errors = sorted(errors, key=lambda e: (str(e.path), e.line))
        first = self.errors[0]
        self.path, self.line, self.where = first.path, first.line, first.where
        UsageError.__init__(
            self, "\n".join(str(e) for e in self.errors) + f"\n({len(self.errors)} errors)"
        )


def _one_or_all(errors: list[ScenarioError]) -> ScenarioError:
    return errors[0] if len(errors) == 1 else ScenarioErrors(errors)


# The errors of the file being read, while one is (see :func:`load_scenario`).
_noted: contextvars.ContextVar[list[ScenarioError] | None] = contextvars.ContextVar(
    "scenario_errors", default=None
)


def _note(error: ScenarioError) -> None:
    """Keep ``error`` to report with the file's others, or raise it when nothing collects."""
    noted = _noted.get()
    if noted is None:
        raise error
    noted.append(error)


class _AlreadyReported(Exception):
    """A step names a group whose own error is already noted: nothing more to say."""


@contextlib.contextmanager
def _reading_on() -> Iterator[None]:
    """Note an error raised inside and go on after the block (one group, one step …)."""
    try:
        yield
    except ScenarioError as error:
        _note(error)
    except _AlreadyReported:
        pass


# -- YAML with line numbers -------------------------------------------------------------------


class _Map(dict[str, Any]):
    """A YAML mapping that remembers its line and the line of every key."""

    line: int
    lines: dict[str, int]


class _Seq(list[Any]):
    line: int
    lines: list[int]


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _convert(node: yaml.Node, loader: yaml.SafeLoader, path: Path) -> Any:
    if isinstance(node, yaml.MappingNode):
        mapping = _Map()
        mapping.line, mapping.lines = _line(node), {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, str):
                raise ScenarioError(path, _line(key_node), str(key), "field names must be text")
            if key in mapping:
                raise ScenarioError(path, _line(key_node), key, "given twice")
            mapping[key] = _convert(value_node, loader, path)
            mapping.lines[key] = _line(key_node)
        return mapping
    if isinstance(node, yaml.SequenceNode):
        sequence = _Seq(_convert(item, loader, path) for item in node.value)
        sequence.line, sequence.lines = _line(node), [_line(item) for item in node.value]
        return sequence
    return loader.construct_object(node)


def _parse_yaml(path: Path, text: str) -> _Map:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        raise ScenarioError(path, line, "YAML", str(exc.problem or exc)) from None
    finally:
        loader.dispose()
    if node is None:
        raise ScenarioError(path, 1, "file", "empty: a scenario needs name, fleet and steps")
    document = _convert(node, yaml.SafeLoader(""), path)
    if not isinstance(document, _Map):
        raise ScenarioError(path, 1, "file", "a scenario is a mapping of name, fleet, steps ...")
    return document


# -- field access with errors that point at the file -----------------------------------------


# What ``enrollment:`` may expect, compared exactly with what the device got.
ENROLLMENT_OUTCOMES = (
    "enrolled",
    *(f"refused {reason}" for reason in ENROLLMENT_REFUSALS),
    *(f"failed {reason}" for reason in ENROLLMENT_FAILURES),
)


def _suggest(word: str, choices: Iterable[str]) -> str:
    """The nearest valid name: one that holds the word whole (``revoked`` in
    ``certificate_revoked``), else the closest spelling."""
    options = [str(c) for c in choices]
    word = word.strip().replace(" ", "_")  # 'not authorized' was meant as not_authorized
    holding = sorted((c for c in options if word and word in c), key=len)
    close = holding[:1] or difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Fields:
    """One mapping of the file, read field by field; unknown fields are errors."""

    def __init__(self, path: Path, mapping: _Map, where: str, allowed: Iterable[str]) -> None:
        self.path, self.mapping, self.where = path, mapping, where
        allowed = tuple(allowed)
        for key in mapping:
            if key not in allowed:
                _note(
                    ScenarioError(
                        path,
                        mapping.lines[key],
                        where,
                        f"unknown field {key!r}{_suggest(key, allowed)}; "
                        f"valid fields: {', '.join(allowed)}",
                    )
                )

    def line(self, key: str | None = None) -> int:
        return self.mapping.lines.get(key, self.mapping.line) if key else self.mapping.line

    def error(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(self.path, self.line(key), f"{self.where}.{key}", problem)

    def has(self, key: str) -> bool:
        return key in self.mapping

    def get(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        """The field's value, or ``default`` when it is absent (or wrong: the error is noted)."""
        if key not in self.mapping:
            return default
        try:
            return self.required(key, convert)
        except ScenarioError as error:
            _note(error)
            return default

    def required(self, key: str, convert: Callable[[Any], T]) -> T:
        if key not in self.mapping:
            raise ScenarioError(self.path, self.line(), self.where, f"missing field {key!r}")
        try:
            return convert(self.mapping[key])
        except (ValueError, TypeError, UsageError) as exc:
            raise self.error(key, str(exc)) from None


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected text")
    return value.strip()


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0, got {value!r}")
    return value


def _positive_count(value: Any) -> int:
    if _count(value) < 1:
        raise ValueError("expected a whole number >= 1")
    return int(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _seconds(value: Any, *, allow_negative: bool = False) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(value, allow_negative=allow_negative).total_seconds()
    else:
        raise ValueError(f"expected a duration such as 500ms, 2s or 1m, got {value!r}")
    if seconds < 0 and not allow_negative:
        raise ValueError("a duration here must not be negative")
    return seconds


def _duration(value: Any) -> float:
    if isinstance(value, str) and value.strip().endswith("ms"):
        try:
            return float(value.strip()[:-2]) / 1000
        except ValueError:
            raise ValueError(f"invalid duration {value!r}") from None
    return _seconds(value)


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError("the duration must be longer than zero")
    return seconds


def _signed_duration(value: Any) -> float:
    return _seconds(value, allow_negative=True)


def _rate(value: Any) -> float:
    text = str(value).strip()
    number = text[:-2] if text.endswith("/s") else text
    try:
        rate = float(number)
    except ValueError:
        raise ValueError(f"expected a rate such as 200/s, got {value!r}") from None
    if rate <= 0:
        raise ValueError("the rate must be positive")
    return rate


def _choice(choices: Iterable[str]) -> Callable[[Any], str]:
    options = tuple(str(choice) for choice in choices)

    def convert(value: Any) -> str:
        text = str(value).strip()
        if text not in options:
            raise ValueError(
                f"{text!r} is not one of {', '.join(options)}{_suggest(text, options)}"
            )
        return text

    return convert


def _device_sighting(value: Any) -> str:
    text = str(value).strip()
    if text not in DEVICE_SIGHTINGS:
        outcomes = ", ".join(REASONS_BY_OUTCOME)
        raise ValueError(
            f"{text!r} is neither an outcome ({outcomes}) nor a reason of one, alone or as "
            f"'OUTCOME: REASON'{_suggest(text, DEVICE_SIGHTINGS)}; see scenarios/README.md"
        )
    return text


def _enrollment_outcome(name: str) -> str | None:
    """The outcome ``name`` stands for: itself, or the one outcome ending in that reason."""
    if name in ENROLLMENT_OUTCOMES:
        return name
    carrying = [o for o in ENROLLMENT_OUTCOMES if o.split(" ", 1)[-1] == name]
    return carrying[0] if len(carrying) == 1 else None


def _qos(value: Any) -> int:
    if value not in (0, 1):
        raise ValueError("expected 0 or 1")
    return int(value)


# -- the scenario ------------------------------------------------------------------------------

_TOP_FIELDS = (
    "name",
    "description",
    "seed",
    "timeout",
    "crl_valid_for",
    "certificate_requests",
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
)


def load_scenario(path: Path) -> Scenario:
    """Read and check ``path``; raise :class:`ScenarioError` naming file, line and field (a
    :class:`ScenarioErrors` holding every error, when there are several)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the scenario ({exc.strerror})") from None
    document = _parse_yaml(path, text)
    errors: list[ScenarioError] = []
    token = _noted.set(errors)
    try:
        scenario = _scenario(path, document)
    except ScenarioError as error:
        errors.append(error)
    finally:
        _noted.reset(token)
    if errors:
        raise _one_or_all(errors)
    return scenario


def _scenario(path: Path, document: _Map) -> Scenario:
    top = _Fields(path, document, "scenario", _TOP_FIELDS)
    name = ""
    with _reading_on():
        name = top.required("name", _text)
    groups, broken = _groups(path, top)
    group_names = {g.name: g for g in groups}
    steps = _steps(path, top, group_names, broken)
    requests = top.get("certificate_requests", _flag, False)
    for group in groups:
        if (group.enroll_with or group.auto_renew) and not requests:
            _note(
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
        description=top.get("description", _text, ""),
        path=path,
        seed=top.get("seed", _count, 0),
        groups=groups,
        broker=_broker(path, top),
        devices=_device_defaults(path, top),
        steps=steps,
        timeout=top.get("timeout", _positive_duration, 120.0),
        crl_valid_for=top.get("crl_valid_for", _positive_duration, None),
        certificate_requests=requests,
        tags=tuple(top.get("tags", lambda v: [_text(t) for t in _sequence(v)], [])),
    )


def _sequence(value: Any) -> _Seq:
    if not isinstance(value, _Seq):
        raise ValueError("expected a list")
    return value


def _mapping(path: Path, parent: _Fields, key: str) -> _Map | None:
    value = parent.mapping.get(key)
    if value is None:
        return None
    if not isinstance(value, _Map):
        raise parent.error(key, "expected a mapping of fields")
    return value


def _broker(path: Path, top: _Fields) -> BrokerSpec:
    mapping = _mapping(path, top, "broker")
    if mapping is None:
        return BrokerSpec()
    fields = _Fields(
        path, mapping, "broker", ("env", "revocation_policy", "needs_fleet_broker", "crl_from")
    )
    return BrokerSpec(
        env=fields.get("env", _choice(ENVIRONMENTS), None),
        revocation_policy=fields.get(
            "revocation_policy", _choice(REVOCATION_POLICIES), "fail-closed"
        ),
        needs_fleet_broker=fields.get("needs_fleet_broker", _text, None),
        crl_from=fields.get("crl_from", _choice(CRL_SOURCES), "file"),
    )


def _device_defaults(path: Path, top: _Fields) -> DeviceDefaults:
    mapping = _mapping(path, top, "devices")
    if mapping is None:
        return DeviceDefaults()
    allowed = (
        "publish_every",
        "qos",
        "payload_size",
        "backoff_base",
        "backoff_cap",
        "connect_timeout",
    )
    fields = _Fields(path, mapping, "devices", allowed)
    defaults = DeviceDefaults()
    return DeviceDefaults(
        publish_every=fields.get("publish_every", _positive_duration, defaults.publish_every),
        qos=fields.get("qos", _qos, defaults.qos),
        payload_size=fields.get("payload_size", _count, defaults.payload_size),
        backoff_base=fields.get("backoff_base", _positive_duration, defaults.backoff_base),
        backoff_cap=fields.get("backoff_cap", _positive_duration, defaults.backoff_cap),
        connect_timeout=fields.get("connect_timeout", _positive_duration, defaults.connect_timeout),
    )


def _groups(path: Path, top: _Fields) -> tuple[tuple[Group, ...], set[str]]:
    """The fleet's groups, and the names of those that could not be read (so that the steps
    naming them are not reported as naming an unknown group too)."""
    raw = top.required("fleet", _sequence)
    if not raw:
        raise top.error("fleet", "declare at least one device group")
    groups: dict[str, Group] = {}
    broken: set[str] = set()
    for index, item in enumerate(raw):
        where = f"fleet[{index}]"
        if not isinstance(item, _Map):
            _note(
                ScenarioError(
                    path, raw.lines[index], where, "a group is a mapping (name, count, ...)"
                )
            )
            continue
        name = item.get("name")
        with _reading_on():
            groups_before = len(groups)
            _group(path, item, where, groups)
        if len(groups) == groups_before and isinstance(name, str):
            broken.add(name.strip())
    return tuple(groups.values()), broken


def _group(path: Path, item: _Map, where: str, groups: dict[str, Group]) -> None:
    """Read one group into ``groups``, or raise its first error."""
    fields = _Fields(path, item, where, _GROUP_FIELDS)
    name = fields.required("name", _group_name)
    if name in groups:
        raise fields.error("name", f"group {name!r} is declared twice")
    group = Group(
        name=name,
        count=fields.required("count", _positive_count),
        line=item.line,
        tier=fields.get("tier", _choice(TIERS), "bronze"),
        env=fields.get("env", _choice(ENVIRONMENTS), "prod"),
        valid_for=fields.get("valid_for", _positive_duration, 3600.0),
        starts_in=fields.get("starts_in", _signed_duration, 0.0),
        issuer=Issuer(fields.get("issuer", _choice(Issuer), Issuer.FLEET.value)),
        eku=Eku(fields.get("eku", _choice(Eku), Eku.CLIENT_AUTH.value)),
        clone_of=fields.get("clone_of", _text, None),
        client_id_of=fields.get("client_id_of", _text, None),
        enroll_with=fields.get("enroll_with", _group_name, None),
        holds_claim=fields.get("holds_claim", _group_name, None),
        auto_renew=fields.get("auto_renew", _fraction, None),
        impersonates=fields.get("impersonates", _text, None),
        pin_broker=fields.get("pin_broker", _flag, False),
        presents_certificate=fields.get("presents_certificate", _flag, True),
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
                key, f"no group {other!r} declared before this one{_suggest(other, groups)}"
            )
        if groups[other].count < group.count:
            raise fields.error(key, f"group {other!r} has fewer than {group.count} devices")
    groups[name] = group


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError("expected a fraction of the lifetime between 0 and 1, e.g. 0.66")
    return float(value)


def _group_name(value: Any) -> str:
    name = _text(value)
    validate_device_id(f"{name}-1")
    if "#" in name:
        raise ValueError("a group name cannot contain '#'")
    return name


# -- steps -------------------------------------------------------------------------------------

_STEP_FIELDS: dict[str, tuple[str, ...]] = {
    "provision": ("groups",),
    "connect": ("devices", "rate", "reconnect"),
    "disconnect": ("devices",),
    "publish": ("devices", "topic", "count", "qos"),
    "subscribe": ("devices", "topic", "qos"),
    "revoke": ("devices", "superseded_only"),
    "rotate": ("devices", "valid_for", "reconnect"),
    "replace": ("devices", "valid_for"),
    "restart_broker": ("env", "revocation_policy", "clear_env", "down_for"),
    "broker_certificate": ("certificate",),
    "stale_crl": ("after",),
    "publish_crl": (),
    "stop_broker": (),
    "start_broker": (),
    "stop_control_plane": (),
    "start_control_plane": (),
    "rotate_ca": (),
    "retire_ca": (),
    "revoke_issuing_ca": (),
    "create_claim": (
        "name",
        "max_uses",
        "allow_ids",
        "valid_for",
        "tier",
        "env",
        "device_valid_for",
    ),
    "enroll": ("devices",),
    "revoke_claim": ("name",),
    "expect": (
        "devices",
        "state",
        "broker",
        "device",
        "lost",
        "drops",
        "refusals",
        "delivered_at_least",
        "acknowledged_at_least",
        "received",
        "received_at_least",
        "subscription",
        "others_unaffected",
        "broker_event",
        "enrollment",
        "renewed_at_least",
        "renewal_failures",
        "within",
    ),
    "wait": ("for", "until", "timeout"),
}
# Fields of 'expect' that are not a check of each named device.
_FLEET_WIDE_CHECKS = ("devices", "others_unaffected", "broker_event", "within")
# The field a bare value stands for: ``- revoke: sensors#3`` is ``- revoke: {devices: sensors#3}``.
_SHORTHAND = {
    "provision": "groups",
    "connect": "devices",
    "disconnect": "devices",
    "revoke": "devices",
    "rotate": "devices",
    "replace": "devices",
    "broker_certificate": "certificate",
    "stale_crl": "after",
    "wait": "for",
    "enroll": "devices",
    "revoke_claim": "name",
}


class _StepReader:
    def __init__(self, path: Path, groups: dict[str, Group], broken: set[str]) -> None:
        self.path, self.groups, self.broken = path, groups, broken
        # groups that enroll or hold a claim exist from the start: nothing to provision
        self.provisioned: dict[str, int] = {n: 0 for n, g in groups.items() if not g.provisioned}
        self.revoked: dict[tuple[str, int], int] = {}  # (group, member) -> line of its revoke

    def read(self, item: Any, line: int, where: str) -> Step:
        if not isinstance(item, _Map) or len(item) != 1:
            raise ScenarioError(
                self.path,
                line,
                where,
                f"a step is a mapping with one step name, one of: {', '.join(STEP_KINDS)}",
            )
        kind, body = next(iter(item.items()))
        if kind not in _STEP_FIELDS:
            raise ScenarioError(
                self.path,
                line,
                where,
                f"unknown step {kind!r}{_suggest(kind, STEP_KINDS)}; steps: {', '.join(STEP_KINDS)}",
            )
        where = f"{where}.{kind}"
        if body is None:
            body = _Map()
            body.line, body.lines = line, {}
        if not isinstance(body, _Map):
            if kind not in _SHORTHAND:
                raise ScenarioError(self.path, line, where, "expected a mapping of fields")
            value, body = body, _Map()
            body.line, body.lines = line, {_SHORTHAND[kind]: line}
            body[_SHORTHAND[kind]] = value
        fields = _Fields(self.path, body, where, _STEP_FIELDS[kind])
        step: Step = getattr(self, f"_{kind}")(fields, line)
        return step

    # selectors ---------------------------------------------------------------------------

    def devices(self, fields: _Fields) -> Selector:
        """The step's required ``devices``."""
        selector = self.selector(fields)
        if selector is None:
            raise ScenarioError(self.path, fields.line(), fields.where, "missing field 'devices'")
        return selector

    def selector(self, fields: _Fields, key: str = "devices") -> Selector | None:
        """The devices a step names, checked against the groups; None when not given."""
        if not fields.has(key):
            return None
        value = fields.mapping[key]
        items = value if isinstance(value, list) else [value]
        refs: list[tuple[str, int | None, int | None]] = []
        for item in items:
            text = str(item).strip()
            match = _SELECTOR.fullmatch(text)
            if match is None:
                raise fields.error(
                    key, f"{text!r} is not a group or a member such as sensors#3 or sensors#2-5"
                )
            group_name, first, last = match.group(1), match.group(2), match.group(3)
            group = self.groups.get(group_name)
            if group is None and group_name in self.broken:
                raise _AlreadyReported
            if group is None:
                raise fields.error(
                    key, f"no group {group_name!r}{_suggest(group_name, self.groups)}"
                )
            if group_name not in self.provisioned:
                raise fields.error(key, f"group {group_name!r} is used before its provision step")
            lo = int(first) if first else None
            hi = int(last) if last else lo
            if lo is not None and hi is not None and not 1 <= lo <= hi <= group.count:
                raise fields.error(
                    key, f"{text!r}: members of {group_name!r} are numbered 1 to {group.count}"
                )
            refs.append((group_name, lo, hi))
        return Selector(tuple(refs), ", ".join(str(i) for i in items))

    # one method per step -------------------------------------------------------------------

    def _provision(self, fields: _Fields, line: int) -> Step:
        value = fields.required("groups", lambda v: v)
        names = (
            list(self.groups) if value == "all" else (value if isinstance(value, list) else [value])
        )
        for name in names:
            if name in self.broken:
                raise _AlreadyReported
            if name not in self.groups:
                raise fields.error("groups", f"no group {name!r}{_suggest(str(name), self.groups)}")
            if not self.groups[name].provisioned:
                raise fields.error(
                    "groups", f"{name!r} enrolls through a claim or holds one: not provisioned"
                )
            if name in self.provisioned:
                raise fields.error(
                    "groups",
                    f"{name!r} is already provisioned (line {self.provisioned[name]}): "
                    "provisioning it again would replace its devices; declare another group",
                )
            original = self.groups[name].clone_of
            if original is not None and original not in self.provisioned and original not in names:
                # a clone has no certificates of its own: its original must be provisioned
                raise fields.error("groups", f"{name!r} clones {original!r}: provision that too")
        self.provisioned.update((str(n), line) for n in names)
        return ProvisionStep(line, tuple(str(n) for n in names))

    def _connect(self, fields: _Fields, line: int) -> Step:
        selector = self.devices(fields)
        return ConnectStep(
            line,
            selector,
            rate=fields.get("rate", _rate, None),
            reconnect=fields.get("reconnect", _flag, True),
        )

    def _disconnect(self, fields: _Fields, line: int) -> Step:
        selector = self.devices(fields)
        return DisconnectStep(line, selector)

    def _publish(self, fields: _Fields, line: int) -> Step:
        selector = self.devices(fields)
        return PublishStep(
            line,
            selector,
            topic=fields.required("topic", _text),
            count=fields.get("count", _positive_count, 1),
            qos=fields.get("qos", _qos, 1),
        )

    def _subscribe(self, fields: _Fields, line: int) -> Step:
        selector = self.devices(fields)
        return SubscribeStep(
            line, selector, topic=fields.required("topic", _text), qos=fields.get("qos", _qos, 1)
        )

    def _members(self, selector: Selector) -> Iterator[tuple[str, int]]:
        for group_name, lo, hi in selector.refs:
            first, last = (lo, hi) if lo is not None and hi is not None else (1, None)
            for number in range(first, (last or self.groups[group_name].count) + 1):
                yield group_name, number

    def _revoke(self, fields: _Fields, line: int) -> Step:
        selector = self.devices(fields)
        superseded_only = fields.get("superseded_only", _flag, False)
        if not superseded_only:
            for member in self._members(selector):
                self.revoked.setdefault(member, line)
        return RevokeStep(line, selector, superseded_only=superseded_only)

    def _rotate(self, fields: _Fields, line: int) -> Step:
        selector = self.devices(fields)
        for group_name, number in self._members(selector):
            revoked_at = self.revoked.get((group_name, number))
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
            valid_for=fields.get("valid_for", _positive_duration, None),
            reconnect=fields.get("reconnect", _flag, True),
        )

    def _replace(self, fields: _Fields, line: int) -> Step:
        selector = self.devices(fields)
        for group_name, number in self._members(selector):
            if not self.groups[group_name].fleet_issued:
                raise fields.error(
                    "devices", f"{group_name!r} is not issued by the fleet: nothing to replace"
                )
            if (group_name, number) not in self.revoked:
                raise fields.error(
                    "devices",
                    f"{group_name}#{number} is not revoked: only a revoked device is replaced "
                    "(add a 'revoke' step before)",
                )
        for member in self._members(selector):
            del self.revoked[member]
        return ReplaceStep(
            line, selector, valid_for=fields.get("valid_for", _positive_duration, None)
        )

    def _restart_broker(self, fields: _Fields, line: int) -> Step:
        return RestartBrokerStep(
            line,
            env=fields.get("env", _choice(ENVIRONMENTS), None),
            revocation_policy=fields.get("revocation_policy", _choice(REVOCATION_POLICIES), None),
            clear_env=fields.get("clear_env", _flag, False),
            down_for=fields.get("down_for", _duration, 0.0),
        )

    def _broker_certificate(self, fields: _Fields, line: int) -> Step:
        kind = fields.required("certificate", _choice(BrokerCertificate))
        return BrokerCertificateStep(line, BrokerCertificate(kind))

    def _stale_crl(self, fields: _Fields, line: int) -> Step:
        return StaleCrlStep(line, after=fields.required("after", _positive_duration))

    def _publish_crl(self, fields: _Fields, line: int) -> Step:
        return PublishCrlStep(line)

    def _stop_broker(self, fields: _Fields, line: int) -> Step:
        return StopBrokerStep(line)

    def _start_broker(self, fields: _Fields, line: int) -> Step:
        return StartBrokerStep(line)

    def _stop_control_plane(self, fields: _Fields, line: int) -> Step:
        return StopControlPlaneStep(line)

    def _start_control_plane(self, fields: _Fields, line: int) -> Step:
        return StartControlPlaneStep(line)

    def _create_claim(self, fields: _Fields, line: int) -> Step:
        return CreateClaimStep(
            line,
            name=fields.required("name", _group_name),
            max_uses=fields.get("max_uses", _positive_count, 1000),
            allow_ids=fields.get("allow_ids", _text, "*"),
            valid_for=fields.get("valid_for", _positive_duration, 86400.0),
            tier=fields.get("tier", _choice(TIERS), "bronze"),
            env=fields.get("env", _choice(ENVIRONMENTS), "prod"),
            device_valid_for=fields.get("device_valid_for", _positive_duration, 3600.0),
        )

    def _enroll(self, fields: _Fields, line: int) -> Step:
        selector = self.devices(fields)
        for group_name, _, _ in selector.refs:
            if self.groups[group_name].enroll_with is None:
                raise fields.error(
                    "devices", f"group {group_name!r} has no 'enroll_with: CLAIM' to enroll with"
                )
        return EnrollStep(line, selector)

    def _revoke_claim(self, fields: _Fields, line: int) -> Step:
        return RevokeClaimStep(line, name=fields.required("name", _group_name))

    def _rotate_ca(self, fields: _Fields, line: int) -> Step:
        return RotateCaStep(line)

    def _revoke_issuing_ca(self, fields: _Fields, line: int) -> Step:
        return RevokeIssuingCaStep(line)

    def _retire_ca(self, fields: _Fields, line: int) -> Step:
        return RetireCaStep(line)

    def _expect(self, fields: _Fields, line: int) -> ExpectStep:
        selector = self.selector(fields)
        state = fields.get("state", _choice(DeviceState), None)
        step = ExpectStep(
            line,
            devices=selector,
            state=DeviceState(state) if state else None,
            broker=fields.get("broker", _choice(DEVICE_REASONS), None),
            device=fields.get("device", _device_sighting, None),
            lost=fields.get("lost", _count, None),
            drops=fields.get("drops", _count, None),
            refusals=fields.get("refusals", _count, None),
            delivered_at_least=fields.get("delivered_at_least", _count, None),
            acknowledged_at_least=fields.get("acknowledged_at_least", _count, None),
            received=fields.get("received", _count, None),
            received_at_least=fields.get("received_at_least", _count, None),
            subscription=fields.get("subscription", _choice(SUBSCRIPTION_RESULTS), None),
            others_unaffected=fields.get("others_unaffected", _flag, False),
            broker_event=fields.get("broker_event", _choice(BrokerEvent), None),
            enrollment=(
                None
                if isinstance(fields.mapping.get("enrollment"), _Map)
                else fields.get("enrollment", _choice(ENROLLMENT_OUTCOMES), None)
            ),
            enrollment_counts=self._enrollment_counts(fields),
            renewed_at_least=fields.get("renewed_at_least", _count, None),
            renewal_failures=fields.get("renewal_failures", _count, None),
            within=fields.get("within", _positive_duration, 5.0),
            text=_describe(fields),
        )
        per_device = [k for k in _STEP_FIELDS["expect"] if k not in _FLEET_WIDE_CHECKS]
        if selector is None and any(fields.has(k) for k in per_device):
            raise ScenarioError(
                self.path, line, fields.where, "say which devices: add 'devices: GROUP or GROUP#N'"
            )
        if not any(fields.has(k) for k in (*per_device, "others_unaffected", "broker_event")):
            raise ScenarioError(
                self.path, line, fields.where, "nothing to expect: add e.g. 'state: connected'"
            )
        return step

    def _enrollment_counts(self, fields: _Fields) -> tuple[tuple[str, int], ...] | None:
        """``enrollment: {enrolled: 3, claim_exhausted: 2}``: an outcome, or a refusal or
        failure reason alone when only one outcome carries it, with its exact count."""
        value = fields.mapping.get("enrollment")
        if not isinstance(value, _Map):
            return None
        counts: dict[str, int] = {}
        for key, count in value.items():
            where = f"{fields.where}.enrollment.{key}"
            line = value.lines[key]
            outcome = _enrollment_outcome(str(key))
            if outcome is None:
                _note(
                    ScenarioError(
                        self.path,
                        line,
                        where,
                        f"{key!r} is not an enrollment outcome or reason"
                        f"{_suggest(str(key), ENROLLMENT_OUTCOMES)}",
                    )
                )
                continue
            try:
                counts[outcome] = _count(count)
            except ValueError as exc:
                _note(ScenarioError(self.path, line, where, str(exc)))
        return tuple(counts.items())

    def _wait(self, fields: _Fields, line: int) -> Step:
        if fields.has("for") == fields.has("until"):
            raise ScenarioError(
                self.path,
                line,
                fields.where,
                "give either 'for: DURATION' or 'until: {expectation}'",
            )
        if fields.has("for"):
            if fields.has("timeout"):
                raise fields.error("timeout", "'timeout' goes with 'until', not with 'for'")
            return WaitStep(line, seconds=fields.required("for", _duration))
        body = fields.mapping["until"]
        if not isinstance(body, _Map):
            raise fields.error("until", "expected an expectation mapping (devices, state, ...)")
        until_fields = _Fields(self.path, body, f"{fields.where}.until", _STEP_FIELDS["expect"])
        expectation = self._expect(until_fields, fields.line("until"))
        timeout = fields.get("timeout", _positive_duration, expectation.within)
        return WaitStep(line, until=_with_within(expectation, timeout))


def _with_within(step: ExpectStep, within: float) -> ExpectStep:
    from dataclasses import replace

    return replace(step, within=within)


def _describe(fields: _Fields) -> str:
    parts = []
    for key, value in fields.mapping.items():
        if key == "within":
            continue
        shown = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def _steps(
    path: Path, top: _Fields, groups: dict[str, Group], broken: set[str]
) -> tuple[Step, ...]:
    raw = top.required("steps", _sequence)
    if not raw:
        raise top.error("steps", "a scenario needs at least one step")
    reader = _StepReader(path, groups, broken)
    steps = []
    for i, item in enumerate(raw):
        with _reading_on():
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
        raise _one_or_all(errors)
    return scenarios

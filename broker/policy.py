"""The access policy: which topics a device may publish and subscribe to, as data.

A policy is a YAML file of rules. Each rule matches devices by the attributes their certificate
carries (tier, environment, id pattern, trust domain) and grants topic filters, ``{id}`` standing
for the device's own id; a device's rights are every grant of every rule that matches it. A
subscription is granted only when *every* topic its filter can match is granted (see
:func:`broker.acl.filter_covers`). The broker without ``--policy`` uses :data:`DEFAULT_POLICY`,
which is the tier model (bronze, silver, gold) written as rules.

Claim certificates (their enrollment topics only) and the control plane's admin certificate
(the request and reply topics) keep their fixed rights: they are the protocol, not policy.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from broker.acl import TopicRights, filter_covers, topic_matches
from fleet.kernel.durations import parse_instant, parse_positive_duration
from fleet.kernel.errors import UsageError
from fleet.kernel.identity import ENVIRONMENTS, TIERS, DeviceIdentity
from fleet.kernel.lifecycle import EVENTS_FILTER
from fleet.kernel.lined_yaml import (
    FieldReader,
    FileFormatError,
    LinedMap,
    LinedSeq,
    parse_lined_yaml,
    suggest,
)

MAX_RULES = 1000
MAX_FILTERS = 100  # per rule and action
MAX_FILTER_LENGTH = 1024
ID = "{id}"

_RULE_FIELDS = ("name", "match", "publish", "subscribe")
_MATCH_FIELDS = ("tier", "env", "id", "trust_domain")
ACTIONS = ("publish", "subscribe")


class PolicyError(FileFormatError):
    """An access policy file that cannot be used; the message names file, line and field."""


@dataclass(frozen=True, slots=True)
class Match:
    """Which devices a rule or a window is about: every attribute given must match."""

    tiers: tuple[str, ...] = ()  # empty: any
    envs: tuple[str, ...] = ()
    id_patterns: tuple[str, ...] = ()  # shell-style: sensor-*, pump-00??
    trust_domains: tuple[str, ...] = ()

    def mismatch(self, identity: DeviceIdentity) -> str | None:
        """Which attribute keeps ``identity`` out (None: it matches)."""
        checks = (
            ("tier", identity.tier, self.tiers, lambda value, allowed: value in allowed),
            ("env", identity.env, self.envs, lambda value, allowed: value in allowed),
            ("id", identity.device_id, self.id_patterns, _any_glob),
            ("trust_domain", identity.trust_domain, self.trust_domains, lambda v, a: v in a),
        )
        for name, value, allowed, test in checks:
            if allowed and not test(value, allowed):
                return f"{name} is {value!r}, the rule wants {' or '.join(allowed)}"
        return None


@dataclass(frozen=True, slots=True)
class Rule:
    """Devices whose attributes match get ``publish`` and ``subscribe`` (``{id}``: their id)."""

    name: str
    line: int
    match: Match = Match()
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    def mismatch(self, identity: DeviceIdentity) -> str | None:
        return self.match.mismatch(identity)

    def granted(self, action: str, device_id: str) -> tuple[str, ...]:
        filters = self.publish if action == "publish" else self.subscribe
        return tuple(f.replace(ID, device_id) for f in filters)


def _any_glob(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


SIGNATURE_ALGORITHMS = (
    "ecdsa-with-SHA256",
    "ecdsa-with-SHA384",
    "ecdsa-with-SHA512",
    "sha256WithRSAEncryption",
    "sha384WithRSAEncryption",
    "sha512WithRSAEncryption",
    "RSASSA-PSS",
    "ed25519",
    "ed448",
)
_REQUIRE_FIELDS = (
    "organization",
    "min_rsa_bits",
    "min_ec_bits",
    "max_lifetime",
    "signature_algorithms",
)


@dataclass(frozen=True, slots=True)
class Requirements:
    """What every device certificate must be, checked when it connects (``policy_refused``)."""

    organizations: tuple[str, ...] = ()  # subject O, one of these
    min_rsa_bits: int | None = None
    min_ec_bits: int | None = None
    max_lifetime: float | None = None  # seconds from notBefore to notAfter
    signature_algorithms: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        """Whether anything is required (nothing: no certificate need be looked at)."""
        return self != Requirements()

    def problem(self, cert: x509.Certificate) -> str | None:
        """Why ``cert`` does not meet the requirements (None: it does)."""
        organizations = [
            str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        ]
        if self.organizations and not set(organizations) & set(self.organizations):
            shown = ", ".join(organizations) or "none"
            return f"organization {shown} is not {' or '.join(self.organizations)}"
        key = cert.public_key()
        bits = key.key_size if isinstance(key, rsa.RSAPublicKey) else None
        if self.min_rsa_bits and bits is not None and bits < self.min_rsa_bits:
            return f"RSA key of {bits} bits, at least {self.min_rsa_bits} required"
        curve = key.curve.key_size if isinstance(key, ec.EllipticCurvePublicKey) else None
        if self.min_ec_bits and curve is not None and curve < self.min_ec_bits:
            return f"EC key of {curve} bits, at least {self.min_ec_bits} required"
        lifetime = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
        if self.max_lifetime is not None and lifetime > self.max_lifetime:
            return (
                f"certificate lifetime {lifetime / 86400:g} days exceeds the maximum "
                f"{self.max_lifetime / 86400:g} days"
            )
        algorithm = cert.signature_algorithm_oid._name
        if self.signature_algorithms and algorithm not in self.signature_algorithms:
            return f"signature algorithm {algorithm} is not one of {', '.join(self.signature_algorithms)}"
        return None


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW_FIELDS = ("name", "match", "days", "hours", "from", "until")


@dataclass(frozen=True, slots=True)
class Window:
    """When the devices it matches may be connected: on ``days`` (UTC weekdays, empty: every
    day) during ``hours`` (UTC minutes since midnight, start and end; the end may be past
    midnight), or from ``start`` until ``end`` (absolute). Outside every window that matches
    it, a device is refused at CONNECT; a live session is closed when its window ends."""

    name: str
    line: int
    match: Match = Match()
    days: tuple[int, ...] = ()  # 0 is Monday
    hours: tuple[int, int] | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None

    def closes(self, at: dt.datetime) -> dt.datetime | None:
        """When the window open at ``at`` closes; None when it is not open at ``at``."""
        if self.start is not None and self.end is not None:
            return self.end if self.start <= at < self.end else None
        midnight = at.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.hours is None:
            return midnight + dt.timedelta(days=1) if self._on_day(midnight) else None
        first, last = self.hours
        for day in (midnight - dt.timedelta(days=1), midnight):  # a span past midnight
            opens = day + dt.timedelta(minutes=first)
            closes = day + dt.timedelta(minutes=last if last > first else last + 1440)
            if self._on_day(day) and opens <= at < closes:
                return closes
        return None

    def _on_day(self, day: dt.datetime) -> bool:
        return not self.days or day.weekday() in self.days

    def text(self) -> str:
        if self.start is not None and self.end is not None:
            return f"{self.name!r} ({self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC)"
        days = ", ".join(DAYS[d] for d in self.days) or "every day"
        hours = (
            f" {self.hours[0] // 60:02d}:{self.hours[0] % 60:02d}-"
            f"{self.hours[1] // 60:02d}:{self.hours[1] % 60:02d}"
            if self.hours
            else ""
        )
        return f"{self.name!r} ({days}{hours} UTC)"


@dataclass(frozen=True, slots=True)
class WindowVerdict:
    allowed: bool
    closes: dt.datetime | None  # when the allowance ends (None: no window applies)
    text: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Why a device may or may not publish (or subscribe to) a topic."""

    allowed: bool
    rule: str | None  # the rule that grants it
    granted_by: str | None  # the filter, {id} replaced, that grants it
    reasons: tuple[str, ...]  # for a refusal: each rule and why it does not grant

    def text(self) -> str:
        if self.allowed:
            return f"allowed by rule {self.rule!r} ({self.granted_by})"
        return "refused: no rule grants it\n" + "\n".join(f"  {r}" for r in self.reasons)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    rules: tuple[Rule, ...]
    source: str  # the file it came from, or "<default policy>"
    requirements: Requirements = Requirements()
    windows: tuple[Window, ...] = ()

    def window(self, identity: DeviceIdentity, at: dt.datetime) -> WindowVerdict:
        """Whether ``identity`` may be connected at ``at``, and until when."""
        matching = [w for w in self.windows if w.match.mismatch(identity) is None]
        if not matching:
            return WindowVerdict(True, None, "no window applies: any time")
        open_ = [(w, closes) for w in matching if (closes := w.closes(at)) is not None]
        if not open_:
            shown = ", ".join(w.text() for w in matching)
            return WindowVerdict(False, None, f"outside its window(s) {shown}")
        window, closes = max(open_, key=lambda pair: pair[1])
        return WindowVerdict(
            True, closes, f"inside window {window.text()} until {closes:%Y-%m-%d %H:%M:%S} UTC"
        )

    def rights(self, identity: DeviceIdentity) -> TopicRights:
        """Every grant of every rule matching ``identity``, in rule order, each filter once."""
        publish: dict[str, None] = {}
        subscribe: dict[str, None] = {}
        for rule in self.rules:
            if rule.mismatch(identity) is None:
                publish.update(dict.fromkeys(rule.granted("publish", identity.device_id)))
                subscribe.update(dict.fromkeys(rule.granted("subscribe", identity.device_id)))
        return TopicRights(publish=tuple(publish), subscribe=tuple(subscribe))

    def explain(self, identity: DeviceIdentity, action: str, topic: str) -> Decision:
        """Which rule lets ``identity`` publish to (or subscribe to) ``topic``, or why none does."""
        grants: Callable[[str, str], bool] = topic_matches if action == "publish" else filter_covers
        reasons = []
        for rule in self.rules:
            mismatch = rule.mismatch(identity)
            if mismatch is not None:
                reasons.append(f"rule {rule.name!r} (line {rule.line}): {mismatch}")
                continue
            for granted in rule.granted(action, identity.device_id):
                if grants(granted, topic):
                    return Decision(True, rule.name, granted, ())
            shown = ", ".join(rule.granted(action, identity.device_id)) or "nothing"
            reasons.append(f"rule {rule.name!r} (line {rule.line}) matches; it grants {shown}")
        return Decision(False, None, None, tuple(reasons))


# -- reading a policy file ----------------------------------------------------------------------


def load_policy(path: Path) -> AccessPolicy:
    """Read and check ``path``; :class:`PolicyError` names file, line and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(path, 1, "file", f"cannot read the policy ({exc})") from None
    return parse_policy(text, path)


def parse_policy(text: str, path: Path) -> AccessPolicy:
    document = parse_lined_yaml(
        path,
        text,
        error=PolicyError,
        empty="empty: a policy is a mapping with 'rules'",
        not_a_mapping="a policy is a mapping with 'rules'",
    )
    reader = _Reader(path)
    reader.only(document, "policy", ("require", "windows", "rules"))
    requirements = reader.requirements(document)
    windows = reader.windows(document)
    rules = document.get("rules")
    if not isinstance(rules, LinedSeq) or not rules:
        raise PolicyError(path, document.lines.get("rules", 1), "rules", "give a list of rules")
    if len(rules) > MAX_RULES:
        raise PolicyError(path, rules.line, "rules", f"more than {MAX_RULES} rules")
    read = [reader.rule(item, rules.lines[i], f"rules[{i}]") for i, item in enumerate(rules)]
    names: dict[str, int] = {}
    for rule in read:
        if rule.name in names:
            raise PolicyError(
                path,
                rule.line,
                "name",
                f"rule {rule.name!r} is defined twice (line {names[rule.name]})",
            )
        names[rule.name] = rule.line
    return AccessPolicy(tuple(read), str(path), requirements, windows)


class _Reader(FieldReader):
    error = PolicyError

    def rule(self, raw: Any, line: int, where: str) -> Rule:
        item, name, where = self.named(raw, line, where, _RULE_FIELDS, "rule")
        publish, subscribe = (self.filters(item, action, where) for action in ACTIONS)
        if not publish and not subscribe:
            raise self.fail(item.line, where, "grants nothing: give publish or subscribe filters")
        return Rule(name, item.line, self.match(item, where), publish, subscribe)

    def match(self, item: LinedMap, where: str) -> Match:
        match = item.get("match", LinedMap.of(item.line))
        if not isinstance(match, LinedMap):
            raise self.fail(item.lines["match"], f"{where}.match", "expected a mapping")
        self.only(match, f"{where}.match", _MATCH_FIELDS)
        return Match(
            tiers=self.choices(match, "tier", TIERS, where),
            envs=self.choices(match, "env", ENVIRONMENTS, where),
            id_patterns=self.texts(match, "id", where),
            trust_domains=self.texts(match, "trust_domain", where),
        )

    def requirements(self, document: LinedMap) -> Requirements:
        if "require" not in document:
            return Requirements()
        mapping = document["require"]
        if not isinstance(mapping, LinedMap):
            raise self.fail(document.lines["require"], "require", "expected a mapping")
        self.only(mapping, "require", _REQUIRE_FIELDS)
        lifetime = None
        if "max_lifetime" in mapping:
            try:
                lifetime = parse_positive_duration(str(mapping["max_lifetime"])).total_seconds()
            except UsageError as exc:
                raise self.fail(
                    mapping.lines["max_lifetime"], "require.max_lifetime", str(exc)
                ) from None
        return Requirements(
            organizations=self.texts(mapping, "organization", "require", match=False),
            min_rsa_bits=self.bits(mapping, "min_rsa_bits"),
            min_ec_bits=self.bits(mapping, "min_ec_bits"),
            max_lifetime=lifetime,
            signature_algorithms=self.choices(
                mapping, "signature_algorithms", SIGNATURE_ALGORITHMS, "require", match=False
            ),
        )

    def windows(self, document: LinedMap) -> tuple[Window, ...]:
        if "windows" not in document:
            return ()
        items = document["windows"]
        if not isinstance(items, LinedSeq) or len(items) > MAX_RULES:
            raise self.fail(document.lines["windows"], "windows", "expected a list of windows")
        return tuple(
            self.window(item, items.lines[i], f"windows[{i}]") for i, item in enumerate(items)
        )

    def window(self, raw: Any, line: int, where: str) -> Window:
        item, name, where = self.named(raw, line, where, _WINDOW_FIELDS, "window")
        absolute = "from" in item or "until" in item
        if absolute and ("days" in item or "hours" in item):
            raise self.fail(item.line, where, "either from/until, or days/hours, not both")
        if absolute:
            start, end = (self.instant(item, key, where) for key in ("from", "until"))
            if end <= start:
                raise self.fail(item.lines["until"], f"{where}.until", "must be after 'from'")
            return Window(name, item.line, self.match(item, where), start=start, end=end)
        days = self.choices(item, "days", DAYS, where, match=False)
        if not days and "hours" not in item:
            raise self.fail(item.line, where, "give days, hours, or from and until")
        return Window(
            name,
            item.line,
            self.match(item, where),
            days=tuple(DAYS.index(d) for d in days),
            hours=self.hours(item, where) if "hours" in item else None,
        )

    def instant(self, item: LinedMap, key: str, where: str) -> dt.datetime:
        value = item.get(key)
        if isinstance(value, dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        try:
            return parse_instant(str(value), now=dt.datetime.now(dt.UTC))
        except UsageError as exc:
            raise self.fail(item.lines.get(key, item.line), f"{where}.{key}", str(exc)) from None

    def hours(self, item: LinedMap, where: str) -> tuple[int, int]:
        text = str(item["hours"]).strip()
        match = re.fullmatch(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})", text)
        minutes = [int(g) for g in match.groups()] if match else []
        if not match or minutes[0] > 23 or minutes[2] > 24 or minutes[1] > 59 or minutes[3] > 59:
            raise self.fail(
                item.lines["hours"], f"{where}.hours", f"{text!r}: give HH:MM-HH:MM (UTC)"
            )
        first, last = minutes[0] * 60 + minutes[1], minutes[2] * 60 + minutes[3]
        if first == last:
            raise self.fail(item.lines["hours"], f"{where}.hours", "the window is empty")
        return first, last

    def bits(self, mapping: LinedMap, key: str) -> int | None:
        value = mapping.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16384:
            raise self.fail(mapping.lines[key], f"require.{key}", "expected a number of bits")
        return value

    def texts(
        self, mapping: LinedMap, key: str, where: str, *, match: bool = True
    ) -> tuple[str, ...]:
        if key not in mapping:
            return ()
        value = mapping[key]
        values = list(value) if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            field = f"{where}.match.{key}" if match else f"{where}.{key}"
            raise self.fail(mapping.lines[key], field, "expected text or a list")
        return tuple(v.strip() for v in values)

    def choices(
        self, mapping: LinedMap, key: str, allowed: Iterable[str], where: str, *, match: bool = True
    ) -> tuple[str, ...]:
        values = self.texts(mapping, key, where, match=match)
        options = tuple(allowed)
        for value in values:
            if value not in options:
                raise self.fail(
                    mapping.lines[key],
                    f"{where}.match.{key}" if match else f"{where}.{key}",
                    f"{value!r} is not one of {', '.join(options)}{suggest(value, options)}",
                )
        return values

    def filters(self, rule: LinedMap, action: str, where: str) -> tuple[str, ...]:
        if action not in rule:
            return ()
        value = rule[action]
        line = rule.lines[action]
        if not isinstance(value, list) or len(value) > MAX_FILTERS:
            raise self.fail(
                line, f"{where}.{action}", f"expected a list of at most {MAX_FILTERS} topic filters"
            )
        for index, topic_filter in enumerate(value):
            problem = filter_problem(topic_filter)
            if problem is None and action == "publish" and _reaches_events(topic_filter):
                problem = f"{topic_filter!r}: only the broker publishes on {EVENTS_FILTER}"
            if problem is not None:
                item_line = value.lines[index] if isinstance(value, LinedSeq) else line
                raise self.fail(item_line, f"{where}.{action}[{index}]", problem)
        return tuple(value)


def _reaches_events(topic_filter: str) -> bool:
    """Whether a publish grant could match a lifecycle event, ``$fleet/events/<kind>/<id>``
    (a wildcard first level never matches a $-topic [MQTT-4.7.2-1])."""
    levels = topic_filter.split("/")
    if levels[0] != "$fleet" or len(levels) < 2:
        return False
    if levels[1] == "#":
        return True
    if levels[1] not in ("events", "+"):
        return False
    return "#" in levels[2:] or len(levels) == 4


def filter_problem(topic_filter: object) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT topic filter (``{id}`` allowed as a level's
    text), or None."""
    if not isinstance(topic_filter, str) or not topic_filter:
        return f"expected a topic filter such as 'devices/{ID}/#', got {topic_filter!r}"
    if len(topic_filter) > MAX_FILTER_LENGTH or "\x00" in topic_filter:
        return f"{topic_filter[:40]!r}: too long or holds NUL"
    if "{" in topic_filter.replace(ID, "") or "}" in topic_filter.replace(ID, ""):
        return f"{topic_filter!r}: the only placeholder is {ID}"
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return f"{topic_filter!r}: '#' must be a whole level, and the last"
        if "+" in level and level != "+":
            return f"{topic_filter!r}: '+' must be a whole level"
    return None


# -- the default: the tier model, as rules -------------------------------------------------------

DEFAULT_POLICY_YAML = """\
# mtls-fleet's default access policy: the tier model (bronze < silver < gold).
rules:
  - name: own-topics            # every device: its own subtree, broadcasts, its renewal topics
    publish: ["devices/{id}/#", "$fleet/renew/{id}/request"]
    subscribe: ["devices/{id}/#", "fleet/broadcast/#", "$fleet/renew/{id}/reply"]
  - name: read-telemetry        # silver and gold read every device's telemetry
    match: {tier: [silver, gold]}
    subscribe: ["devices/+/telemetry"]
  - name: broadcast-and-command # gold broadcasts and sends commands to any device
    match: {tier: gold}
    publish: ["fleet/broadcast/#", "devices/+/commands"]
"""

DEFAULT_POLICY = parse_policy(DEFAULT_POLICY_YAML, Path("<default policy>"))


def rights_for(device_id: str, tier: str, env: str = "prod") -> TopicRights:
    """The rights the default policy gives a device of ``tier`` (in ``env``)."""
    return DEFAULT_POLICY.rights(DeviceIdentity(device_id, tier, env, "fleet.local"))

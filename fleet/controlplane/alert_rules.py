"""Alert rules as data (``fleet serve --alerts alerts.yaml``), read with every error naming the
file, the line and the field (``fleet alerts check FILE``).

::

    deliver:
      log: true                                  # a WARNING line per alert (default true)
      mqtt: $fleet/alerts                        # published on <topic>/<rule> by the admin
      webhook: http://127.0.0.1:9000/alerts      # POSTed as JSON
    rules:
      - name: expiring-soon
        kind: certificate_expiring               # devices whose certificate expires within
        within: 7d                               #   this, at least min_devices of them
      - name: revoked-device-knocking
        kind: rejected_attempt                   # a refused attempt for one of these reasons
        reasons: [revoked, unknown_ca]
        severity: critical
      - name: rejection-spike
        kind: rejection_rate                     # the share of refused attempts over window
        window: 1m
        above: 0.5
        min_attempts: 20
      - name: crl-stale
        kind: crl_stale                          # the CRL is past nextUpdate, or older than
        older_than: 12h
"""

from __future__ import annotations

import enum
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fleet.kernel.durations import parse_positive_duration
from fleet.kernel.errors import UsageError
from fleet.kernel.lifecycle import ALERTS_PREFIX, REJECT_REASONS, topic_level
from fleet.kernel.lined_yaml import (
    FieldReader,
    FileFormatError,
    LinedMap,
    LinedSeq,
    parse_lined_yaml,
    suggest,
)

MAX_RULES = 100
E = TypeVar("E", bound=enum.StrEnum)


class AlertRulesError(FileFormatError):
    """An alert rules file that cannot be used; the message names file, line and field."""


class AlertKind(enum.StrEnum):
    CERTIFICATE_EXPIRING = "certificate_expiring"
    REJECTED_ATTEMPT = "rejected_attempt"
    REJECTION_RATE = "rejection_rate"
    CRL_STALE = "crl_stale"


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


# the fields each kind takes besides name, kind, severity and repeat
_KIND_FIELDS: dict[AlertKind, tuple[str, ...]] = {
    AlertKind.CERTIFICATE_EXPIRING: ("within", "min_devices"),
    AlertKind.REJECTED_ATTEMPT: ("reasons",),
    AlertKind.REJECTION_RATE: ("window", "above", "min_attempts"),
    AlertKind.CRL_STALE: ("older_than",),
}
_COMMON = ("name", "kind", "severity", "repeat")


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    kind: AlertKind
    severity: Severity
    line: int
    repeat_seconds: float = 300.0  # rejected_attempt: at most one alert per device this often
    within_seconds: float = 7 * 86400.0
    min_devices: int = 1
    reasons: tuple[str, ...] = ()
    window_seconds: float = 60.0
    above: float = 0.5
    min_attempts: int = 20
    older_than_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    log: bool = True
    mqtt_topic: str | None = None
    webhook: str | None = None


@dataclass(frozen=True, slots=True)
class AlertRules:
    source: Path
    rules: tuple[AlertRule, ...]
    delivery: Delivery

    @property
    def event_rules(self) -> tuple[AlertRule, ...]:
        return tuple(r for r in self.rules if r.kind is AlertKind.REJECTED_ATTEMPT)

    @property
    def periodic_rules(self) -> tuple[AlertRule, ...]:
        return tuple(r for r in self.rules if r.kind is not AlertKind.REJECTED_ATTEMPT)


def load_alert_rules(path: Path) -> AlertRules:
    """Read and check ``path``; :class:`AlertRulesError` names file, line and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read alert rules {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AlertRulesError(path, 1, "file", "not UTF-8 text") from None
    return parse_alert_rules(text, path)


def parse_alert_rules(text: str, path: Path) -> AlertRules:
    """Check ``text`` (read from ``path``, named in every error)."""
    document = parse_lined_yaml(path, text, error=AlertRulesError)
    return _Reader(path).document(document)


class _Reader(FieldReader):
    error = AlertRulesError

    def document(self, document: LinedMap) -> AlertRules:
        self.only(document, "file", ("deliver", "rules"))
        items = document.get("rules")
        if not isinstance(items, LinedSeq) or not items or len(items) > MAX_RULES:
            raise self.fail(
                document.lines.get("rules", document.line),
                "rules",
                f"expected a list of 1 to {MAX_RULES} rules",
            )
        rules = [self.rule(item, items.lines[i], f"rules[{i}]") for i, item in enumerate(items)]
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise self.fail(rule.line, "rules", f"two rules are named {rule.name!r}")
            seen.add(rule.name)
        return AlertRules(self.path, tuple(rules), self.delivery(document))

    def delivery(self, document: LinedMap) -> Delivery:
        mapping = document.get("deliver", LinedMap.of(document.line))
        if not isinstance(mapping, LinedMap):
            raise self.fail(document.lines["deliver"], "deliver", "expected a mapping")
        self.only(mapping, "deliver", ("log", "mqtt", "webhook"))
        log = mapping.get("log", True)
        if not isinstance(log, bool):
            raise self.fail(mapping.lines["log"], "deliver.log", "expected true or false")
        topic = mapping.get("mqtt")
        if topic is not None and (
            not isinstance(topic, str)
            or not (topic == ALERTS_PREFIX or topic.startswith(ALERTS_PREFIX + "/"))
            or any(c in topic for c in "+#\x00")
            or len(topic) > 200
        ):
            raise self.fail(
                mapping.lines["mqtt"],
                "deliver.mqtt",
                f"expected {ALERTS_PREFIX} or a topic under it (the admin's to publish)",
            )
        webhook = mapping.get("webhook")
        if webhook is not None:
            parts = urllib.parse.urlsplit(str(webhook))
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise self.fail(
                    mapping.lines["webhook"], "deliver.webhook", "expected an http(s):// URL"
                )
        return Delivery(log, topic.rstrip("/") if topic else None, webhook)

    def rule(self, raw: Any, line: int, where: str) -> AlertRule:
        every_field = tuple(dict.fromkeys(f for fs in _KIND_FIELDS.values() for f in fs))
        item, name, where = self.named(raw, line, where, (*_COMMON, *every_field), "rule")
        if topic_level(name) != name:
            raise self.fail(item.lines["name"], f"{where}.name", "use letters, digits, . _ - :")
        kind = self.enum(item, "kind", AlertKind, where, None)
        allowed = (*_COMMON, *_KIND_FIELDS[kind])
        for key in item:
            if key not in allowed:
                raise self.fail(
                    item.lines[key], f"{where}.{key}", f"not a field of a {kind} rule"
                    f"{suggest(key, allowed)}; its fields: {', '.join(allowed)}",
                )  # fmt: skip
        severity = self.enum(item, "severity", Severity, where, Severity.WARNING)
        common: dict[str, Any] = {"name": name, "kind": kind, "severity": severity, "line": line}
        if "repeat" in item:
            common["repeat_seconds"] = self.seconds(item, "repeat", where)
        if kind is AlertKind.CERTIFICATE_EXPIRING:
            return AlertRule(
                **common,
                within_seconds=self.seconds(item, "within", where, required=True),
                min_devices=self.count(item, "min_devices", where, 1),
            )
        if kind is AlertKind.REJECTED_ATTEMPT:
            return AlertRule(**common, reasons=self.reasons(item, where))
        if kind is AlertKind.REJECTION_RATE:
            above = item.get("above", 0.5)
            if isinstance(above, bool) or not isinstance(above, int | float) or not 0 <= above < 1:
                raise self.fail(
                    item.lines.get("above", item.line),
                    f"{where}.above",
                    "a share of refused attempts, from 0 to below 1 (0.5: half)",
                )
            return AlertRule(
                **common,
                window_seconds=self.seconds(item, "window", where, default=60.0),
                above=float(above),
                min_attempts=self.count(item, "min_attempts", where, 20),
            )
        older = self.seconds(item, "older_than", where) if "older_than" in item else None
        return AlertRule(**common, older_than_seconds=older)

    def enum(self, item: LinedMap, key: str, kind: type[E], where: str, default: E | None) -> E:
        if key not in item:
            if default is None:
                raise self.fail(item.line, f"{where}.{key}", f"give one of {', '.join(kind)}")
            return default
        value = str(item[key])
        try:
            return kind(value)
        except ValueError:
            raise self.fail(
                item.lines[key],
                f"{where}.{key}",
                f"{value!r} is not one of {', '.join(kind)}{suggest(value, list(kind))}",
            ) from None

    def seconds(
        self,
        item: LinedMap,
        key: str,
        where: str,
        *,
        required: bool = False,
        default: float = 0.0,
    ) -> float:
        if key not in item:
            if required:
                raise self.fail(item.line, f"{where}.{key}", "give a duration such as 7d or 12h")
            return default
        try:
            return parse_positive_duration(str(item[key])).total_seconds()
        except UsageError as exc:
            raise self.fail(item.lines[key], f"{where}.{key}", str(exc)) from None

    def count(self, item: LinedMap, key: str, where: str, default: int) -> int:
        value = item.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10**9:
            raise self.fail(item.lines.get(key, item.line), f"{where}.{key}", "a whole number ≥ 1")
        return value

    def reasons(self, item: LinedMap, where: str) -> tuple[str, ...]:
        value = item.get("reasons")
        if not isinstance(value, list) or not value:
            raise self.fail(
                item.lines.get("reasons", item.line),
                f"{where}.reasons",
                "a list of refusal reasons, e.g. [revoked, unknown_ca]",
            )
        for index, reason in enumerate(value):
            if reason not in REJECT_REASONS:
                line = value.lines[index] if isinstance(value, LinedSeq) else item.lines["reasons"]
                raise self.fail(
                    line,
                    f"{where}.reasons[{index}]",
                    f"{str(reason)!r} is not a refusal reason{suggest(str(reason), REJECT_REASONS)}",
                )
        return tuple(value)

"""Alerts evaluated live by ``fleet serve --alerts FILE`` (rules: :mod:`alert_rules`).

A refused attempt is judged as its event arrives (``rejected_attempt``: at most one alert per
rule and device per ``repeat``); the others every ``every`` seconds (``certificate_expiring``,
``rejection_rate``, ``crl_stale``): they fire when their condition becomes true and say
``resolved`` when it stops being true. Each alert goes to the log, an MQTT topic and a webhook
as the file says, from a delivery thread of its own, so a slow webhook never holds the MQTT
client or the checks; every delivery is counted in
``fleet_alert_deliveries_total{channel,result}``, every alert in ``fleet_alerts_total{rule}``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from fleet.controlplane.alert_rules import AlertKind, AlertRule, AlertRules
from fleet.controlplane.event_feed import EventFeed
from fleet.controlplane.fleet_view import FleetView
from fleet.kernel.lifecycle import Lifecycle, LifecycleEvent

log = logging.getLogger("mtls_fleet.alerts")

WEBHOOK_TIMEOUT = 5.0
_KEPT = 200
_MAX_QUEUED = 1000

Publish = Callable[[str, bytes], bool]  # topic, payload -> sent


@dataclass(frozen=True, slots=True)
class Alert:
    rule: str
    kind: str
    severity: str
    state: str  # firing | resolved
    at: str
    summary: str
    labels: dict[str, str]
    value: float | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()


class AlertEngine:
    """Evaluates ``rules`` and delivers what fires, until :meth:`stop`."""

    def __init__(
        self,
        rules: AlertRules,
        view: FleetView,
        events: EventFeed | None,
        *,
        metrics: CollectorRegistry | None = None,
        every: float = 5.0,
    ) -> None:
        self.rules = rules
        self.view = view
        self.events = events
        self.every = every
        self.publish: Publish | None = None  # set when an MQTT connection is there
        self._recent: deque[Alert] = deque(maxlen=_KEPT)
        self._lock = threading.Lock()
        self._firing: set[str] = set()
        self._last_per_device: dict[tuple[str, str], float] = {}
        self._outbox: queue.Queue[Alert] = queue.Queue(maxsize=_MAX_QUEUED)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.fired = Counter("fleet_alerts", "Alerts fired, by rule.", ["rule"], registry=metrics)
        self.deliveries = Counter(
            "fleet_alert_deliveries",
            "Alert deliveries, by channel (log, mqtt, webhook) and result (ok, failed, dropped).",
            ["channel", "result"],
            registry=metrics,
        )
        for rule in rules.rules:
            self.fired.labels(rule.name)
        if events is not None and rules.event_rules:
            events.add_listener(self.on_event)

    def start(self) -> None:
        for target in (self._check_forever, self._deliver_forever):
            thread = threading.Thread(target=target, name=f"alerts-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WEBHOOK_TIMEOUT + 5)

    def recent(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(alert) for alert in self._recent]

    # -- judging ----------------------------------------------------------------------------

    def on_event(self, event: LifecycleEvent) -> None:
        """A lifecycle event (the MQTT client's thread): refused attempts the rules name."""
        if event.kind is not Lifecycle.REJECTED or event.reason is None:
            return
        now = time.monotonic()
        for rule in self.rules.event_rules:
            if event.reason not in rule.reasons:
                continue
            key = (rule.name, event.device or "")
            with self._lock:
                last = self._last_per_device.get(key)
                if last is not None and now - last < rule.repeat_seconds:
                    continue
                self._last_per_device[key] = now
            device = event.device or "(no certificate)"
            self._raise(
                rule,
                "firing",
                f"{device} tried to connect with a {event.reason} certificate "
                f"(serial {event.serial or '-'}, from {event.peer or '?'})",
                {"device": device, "reason": event.reason, "peer": event.peer or ""},
            )

    def check(self, *, now: dt.datetime | None = None) -> None:
        """Judge every periodic rule once."""
        now = now or dt.datetime.now(dt.UTC)
        for rule in self.rules.periodic_rules:
            try:
                verdict = self._judge(rule, now)
            except Exception:  # one broken rule does not stop the others
                log.exception("alert rule %s could not be judged", rule.name)
                continue
            self._settle(rule, verdict)

    def _judge(self, rule: AlertRule, now: dt.datetime) -> tuple[str, float] | None:
        """(summary, value) while the rule's condition holds, else None."""
        if rule.kind is AlertKind.CERTIFICATE_EXPIRING:
            horizon = now + dt.timedelta(seconds=rule.within_seconds)
            devices = [
                r
                for r in self.view.workspace.registry.devices(not_after_before=horizon)
                if r.status != "revoked" and r.not_after > now
            ]
            if len(devices) < rule.min_devices:
                return None
            first = min(devices, key=lambda r: r.not_after)
            return (
                f"{len(devices)} device certificate(s) expire within "
                f"{_duration(rule.within_seconds)}; the first, {first.device_id}, at "
                f"{first.not_after:%Y-%m-%d %H:%M} UTC",
                float(len(devices)),
            )
        if rule.kind is AlertKind.REJECTION_RATE:
            if self.events is None:
                return None
            totals = self.events.totals(time.time() - rule.window_seconds)
            attempts = sum(totals.values())
            refused = attempts - totals.get("ok", 0)
            if attempts < rule.min_attempts or refused / attempts <= rule.above:
                return None
            top = ", ".join(
                f"{reason} {count}" for reason, count in totals.most_common(3) if reason != "ok"
            )
            return (
                f"{refused} of {attempts} attempts refused in the last "
                f"{_duration(rule.window_seconds)} ({refused / attempts:.0%}; {top})",
                refused / attempts,
            )
        panel = self.view.revocation({}, now=now)
        if panel["stale"]:
            return f"the CRL #{panel['crl_number']} is past its nextUpdate", panel["age_seconds"]
        older = rule.older_than_seconds
        if older is not None and panel["age_seconds"] > older:
            return (
                f"the CRL #{panel['crl_number']} is {_duration(panel['age_seconds'])} old "
                f"(more than {_duration(older)})",
                panel["age_seconds"],
            )
        return None

    def _settle(self, rule: AlertRule, verdict: tuple[str, float] | None) -> None:
        with self._lock:
            was_firing = rule.name in self._firing
            if verdict is not None:
                self._firing.add(rule.name)
            else:
                self._firing.discard(rule.name)
        if verdict is not None and not was_firing:
            self._raise(rule, "firing", verdict[0], {}, verdict[1])
        elif verdict is None and was_firing:
            self._raise(rule, "resolved", f"{rule.name}: no longer so", {})

    def _raise(
        self,
        rule: AlertRule,
        state: str,
        summary: str,
        labels: dict[str, str],
        value: float | None = None,
    ) -> None:
        alert = Alert(
            rule=rule.name,
            kind=rule.kind.value,
            severity=rule.severity.value,
            state=state,
            at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            summary=summary,
            labels=labels,
            value=value,
        )
        with self._lock:
            self._recent.append(alert)
        if state == "firing":
            self.fired.labels(rule.name).inc()
        try:
            self._outbox.put_nowait(alert)
        except queue.Full:
            self.deliveries.labels("all", "dropped").inc()

    def _check_forever(self) -> None:
        while True:
            self.check()
            if self._stop.wait(self.every):
                return

    # -- delivering -------------------------------------------------------------------------

    def _deliver_forever(self) -> None:
        """Deliver in order; after :meth:`stop`, what is queued still goes out."""
        while not (self._stop.is_set() and self._outbox.empty()):
            try:
                alert = self._outbox.get(timeout=0.25)
            except queue.Empty:
                continue
            self.deliver(alert)

    def deliver(self, alert: Alert) -> None:
        delivery = self.rules.delivery
        if delivery.log:
            log.warning(
                "ALERT %s [%s] %s: %s", alert.state, alert.severity, alert.rule, alert.summary
            )
            self.deliveries.labels("log", "ok").inc()
        if delivery.mqtt_topic is not None:
            sent = self.publish is not None and self.publish(
                f"{delivery.mqtt_topic}/{alert.rule}", alert.to_json()
            )
            self.deliveries.labels("mqtt", "ok" if sent else "failed").inc()
        if delivery.webhook is not None:
            self.deliveries.labels("webhook", _post(delivery.webhook, alert)).inc()


def _post(url: str, alert: Alert) -> str:
    request = urllib.request.Request(
        url, data=alert.to_json(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as answer:
            answer.read(1024)
            return "ok"
    except (OSError, ValueError) as exc:
        log.warning("alert webhook %s failed: %s", url, exc)
        return "failed"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"

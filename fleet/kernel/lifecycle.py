"""Lifecycle events: what the broker publishes on MQTT when a device connects, disconnects or
is refused (AWS IoT's presence events as the model), and how a subscriber reads them back.

Topics: ``$fleet/events/connected/<id>``, ``$fleet/events/disconnected/<id>`` and
``$fleet/events/rejected/<id>``, where ``<id>`` is the certificate's device id (for a refusal,
the common name of the certificate presented, made safe for a topic level, or ``_anonymous``
when none was). Payloads are JSON objects described by the schemas in
``fleet/kernel/schemas/`` (:func:`schema`). Only the broker publishes there: no client may,
whatever its rights; who may *subscribe* is part of the topic rights (the admin by default).

The payloads come from the network, so :func:`parse_event` reads them with limits before any
work and checks every field it returns.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fleet.kernel.bounded_json import JsonRejected, loads_bounded
from fleet.kernel.broker_reasons import Outcome, SessionEnd

EVENTS_PREFIX = "$fleet/events"
EVENTS_FILTER = f"{EVENTS_PREFIX}/#"
ALERTS_PREFIX = "$fleet/alerts"  # the control plane's alerts: $fleet/alerts/<rule>
ALERTS_FILTER = f"{ALERTS_PREFIX}/#"
ANONYMOUS = "_anonymous"
MAX_EVENT_BYTES = 4096
_MAX_LEVEL = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@-]")


class Lifecycle(enum.StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    REJECTED = "rejected"


class Disconnect(enum.StrEnum):
    """Why a session ended: the broker's own reasons (:class:`SessionEnd`) or one of these."""

    CLIENT = "client"  # the client sent DISCONNECT
    CONNECTION_LOST = "connection_lost"  # the socket closed without a DISCONNECT
    BROKER_SHUTDOWN = "broker_shutdown"


DISCONNECT_REASONS: tuple[str, ...] = (*Disconnect, *SessionEnd)
REJECT_REASONS: tuple[str, ...] = tuple(o.value for o in Outcome if o is not Outcome.OK)


def topic_level(name: str | None) -> str:
    """``name`` as one safe topic level: no ``/``, ``+``, ``#`` or control characters."""
    if not name:
        return ANONYMOUS
    return _UNSAFE.sub("_", name)[:_MAX_LEVEL]


def event_topic(kind: Lifecycle, device_id: str | None) -> str:
    return f"{EVENTS_PREFIX}/{kind}/{topic_level(device_id)}"


def is_event_topic(topic: str) -> bool:
    return topic.startswith(EVENTS_PREFIX + "/")


def schema(kind: Lifecycle) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of ``kind``'s payload."""
    text = resources.files("fleet.kernel").joinpath(f"schemas/{kind}.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """One event as a subscriber reads it (the fields every kind has, and the reason)."""

    kind: Lifecycle
    ts: str
    device: str | None
    serial: str | None
    peer: str | None
    reason: str | None  # disconnected: a DISCONNECT_REASONS; rejected: a REJECT_REASONS
    tier: str | None
    env: str | None
    session_seconds: float | None
    raw: dict[str, Any]


class EventRejected(ValueError):
    """A message on an event topic that is not a lifecycle event; the message says why."""


def _text(payload: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = payload.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > 512:
        raise EventRejected(f"field {name!r}: expected a string of at most 512 characters")
    return value


def parse_event(topic: str, data: bytes) -> LifecycleEvent:
    """Read one message of ``$fleet/events/#``; :class:`EventRejected` if it is not an event."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != EVENTS_PREFIX:
        raise EventRejected(f"topic {topic[:80]!r} is not {EVENTS_PREFIX}/<kind>/<id>")
    try:
        kind = Lifecycle(parts[2])
    except ValueError:
        raise EventRejected(f"unknown event kind {parts[2][:40]!r}") from None
    try:
        payload = loads_bounded(data, max_bytes=MAX_EVENT_BYTES, max_depth=2)
    except JsonRejected as exc:
        raise EventRejected(f"payload: {exc}") from None
    if not isinstance(payload, dict):
        raise EventRejected("payload: expected a JSON object")
    if payload.get("event") != kind.value:
        raise EventRejected(f"field 'event': expected {kind.value!r} as the topic says")
    reason = _text(payload, "reason", required=kind is not Lifecycle.CONNECTED)
    allowed = DISCONNECT_REASONS if kind is Lifecycle.DISCONNECTED else REJECT_REASONS
    if reason is not None and reason not in allowed:
        raise EventRejected(f"field 'reason': {reason[:40]!r} is not a {kind} reason")
    seconds = payload.get("session_seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float)):
        raise EventRejected("field 'session_seconds': expected a number")
    return LifecycleEvent(
        kind=kind,
        ts=_text(payload, "ts", required=True) or "",
        device=_text(payload, "device"),
        serial=_text(payload, "serial"),
        peer=_text(payload, "peer"),
        reason=reason,
        tier=_text(payload, "tier"),
        env=_text(payload, "env"),
        session_seconds=float(seconds) if seconds is not None else None,
        raw=payload,
    )

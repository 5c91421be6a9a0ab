"""Topic rights by tier, and the filter-coverage rule that keeps wildcards from leaking.

Every device may publish and subscribe under ``devices/<own id>/#`` and subscribe to
``fleet/broadcast/#``. On top of that:

* ``silver`` may also subscribe to every device's telemetry, ``devices/+/telemetry``;
* ``gold`` has silver's rights, may publish to ``fleet/broadcast/#`` and may send commands to
  any device, ``devices/+/commands``.

A subscription is granted only when *every* topic its filter can match is readable, so
``devices/#`` from a bronze device is refused outright rather than silently narrowed.
"""

from __future__ import annotations

from dataclasses import dataclass

TIER_ORDER = ("bronze", "silver", "gold")


def _levels(text: str) -> list[str]:
    return text.split("/")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 matching of a concrete ``topic`` against ``topic_filter``."""
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False  # [MQTT-4.7.2-1] wildcards at the first level never match $-topics
    filter_levels, topic_levels = _levels(topic_filter), _levels(topic)
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


def filter_covers(allowed: str, requested: str) -> bool:
    """True when every topic ``requested`` can match is also matched by ``allowed``."""
    allowed_levels, requested_levels = _levels(allowed), _levels(requested)
    for index, level in enumerate(allowed_levels):
        if level == "#":
            return True
        if index >= len(requested_levels):
            return False
        wanted = requested_levels[index]
        if wanted == "#":
            return False  # the request reaches deeper than this pattern allows
        if level == "+":
            continue
        if wanted == "+" or wanted != level:
            return False
    return len(allowed_levels) == len(requested_levels)


@dataclass(frozen=True, slots=True)
class TopicRights:
    """What one device may publish and subscribe to."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return any(topic_matches(pattern, topic) for pattern in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        return any(filter_covers(pattern, topic_filter) for pattern in self.subscribe)

    def may_receive(self, topic: str) -> bool:
        return any(topic_matches(pattern, topic) for pattern in self.subscribe)


def rights_for(device_id: str, tier: str) -> TopicRights:
    """The rights of ``device_id`` at ``tier`` (see the module docstring)."""
    own = f"devices/{device_id}/#"
    publish = [own]
    subscribe = [own, "fleet/broadcast/#"]
    rank = TIER_ORDER.index(tier)
    if rank >= 1:
        subscribe.append("devices/+/telemetry")
    if rank >= 2:
        publish += ["fleet/broadcast/#", "devices/+/commands"]
    return TopicRights(publish=tuple(publish), subscribe=tuple(subscribe))

"""Topic rights, and the filter-coverage rule that keeps wildcards from leaking.

A device's rights come from the access policy (:mod:`broker.policy`; by default the tier
model: every device its own ``devices/<id>/#``, ``fleet/broadcast/#`` and its renewal topics,
silver also ``devices/+/telemetry``, gold also publishes broadcasts and commands). A *claim*
certificate gets its own enrollment request's two topics
and nothing else; the *admin* (the control plane) gets every request topic to read and every
reply topic to write (see :mod:`fleet.kernel.mqtt_api`).

A subscription is granted only when *every* topic its filter can match is readable, so
``devices/#`` from a bronze device is refused outright rather than silently narrowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.kernel.lifecycle import ALERTS_FILTER, EVENTS_FILTER
from fleet.kernel.mqtt_api import (
    PROVISION,
    REPLY_PUBLICATIONS,
    REQUEST_SUBSCRIPTIONS,
    reply_topic,
    request_topic,
)


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


def claim_rights(request_id: str) -> TopicRights:
    """A claim certificate's connection: its own enrollment request and reply, nothing else."""
    return TopicRights(
        publish=(request_topic(PROVISION, request_id),),
        subscribe=(reply_topic(PROVISION, request_id),),
    )


# The admin also reads the lifecycle events ($fleet/events/#; a policy may grant them to others)
# and publishes and reads alerts ($fleet/alerts/<rule>, see fleet serve --alerts).
ADMIN_RIGHTS = TopicRights(
    publish=(*REPLY_PUBLICATIONS, ALERTS_FILTER),
    subscribe=(*REQUEST_SUBSCRIPTIONS, EVENTS_FILTER, ALERTS_FILTER),
)
NO_RIGHTS = TopicRights(publish=(), subscribe=())

"""Which sessions a topic reaches, and the retained messages.

A PUBLISH looks up the filter equal to its topic in a dict and matches only the *distinct*
wildcard filters (10,000 devices each subscribed to their own commands topic and a handful of
shared wildcards cost a dict lookup and a few matches, not 10,000); which wildcard filters a
topic matches is remembered until the set of wildcard filters changes.
"""

from __future__ import annotations

from broker.acl import topic_matches
from broker.sessions import Message, Session

_CACHE_LIMIT = 50_000


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class SubscriptionIndex:
    """Filter -> {session: granted QoS}."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[Session, int]] = {}
        self._wildcard: dict[str, dict[Session, int]] = {}
        self._matching_wildcards: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self._exact) + len(self._wildcard)

    def add(self, topic_filter: str, session: Session, qos: int) -> None:
        table = self._wildcard if is_wildcard(topic_filter) else self._exact
        subscribers = table.get(topic_filter)
        if subscribers is None:
            subscribers = table[topic_filter] = {}
            if table is self._wildcard:
                self._matching_wildcards.clear()
        subscribers[session] = qos

    def remove(self, topic_filter: str, session: Session) -> None:
        table = self._wildcard if is_wildcard(topic_filter) else self._exact
        subscribers = table.get(topic_filter)
        if subscribers is None:
            return
        subscribers.pop(session, None)
        if not subscribers:
            del table[topic_filter]
            if table is self._wildcard:
                self._matching_wildcards.clear()

    def subscribers(self, topic: str) -> dict[Session, int]:
        """Every session ``topic`` reaches, once, at the highest QoS any of its matching
        filters was granted [MQTT-3.3.5-1]. The result must not be modified."""
        exact = self._exact.get(topic)
        wildcards = self._matching_wildcards.get(topic)
        if wildcards is None:
            wildcards = tuple(f for f in self._wildcard if topic_matches(f, topic))
            if len(self._matching_wildcards) >= _CACHE_LIMIT:
                self._matching_wildcards.clear()
            self._matching_wildcards[topic] = wildcards
        if not wildcards:
            return exact or {}
        if exact is None and len(wildcards) == 1:
            return self._wildcard[wildcards[0]]
        found = dict(exact or {})
        for topic_filter in wildcards:
            for session, qos in self._wildcard[topic_filter].items():
                if qos > found.get(session, -1):
                    found[session] = qos
        return found


class RetainedMessages:
    """The last retained message per topic (a zero-byte one deletes it [MQTT-3.3.1-10])."""

    def __init__(self) -> None:
        self._by_topic: dict[str, tuple[Message, int]] = {}

    def __contains__(self, topic: str) -> bool:
        return topic in self._by_topic

    def __len__(self) -> int:
        return len(self._by_topic)

    def keep(self, topic: str, payload: bytes, qos: int) -> None:
        if payload:
            self._by_topic[topic] = (Message(topic, payload, retain=True), qos)
        else:
            self._by_topic.pop(topic, None)

    def matching(self, topic_filter: str) -> list[tuple[Message, int]]:
        if not is_wildcard(topic_filter):
            found = self._by_topic.get(topic_filter)
            return [found] if found is not None else []
        return [
            kept for topic, kept in self._by_topic.items() if topic_matches(topic_filter, topic)
        ]

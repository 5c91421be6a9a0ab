"""The broker's subscription index and retained store (broker.routing), checked against the
plain definition: every filter matched one by one with MQTT 3.1.1's rule."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.acl import topic_matches
from broker.routing import RetainedMessages, SubscriptionIndex
from broker.sessions import Session

_levels = st.sampled_from(["a", "b", "c", "$sys", ""])
_topics = st.lists(_levels, min_size=1, max_size=4).map("/".join).filter(bool)
_filter_levels = st.sampled_from(["a", "b", "c", "$sys", "", "+"])


@st.composite
def _filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(_filter_levels, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


_operations = st.lists(
    st.tuples(st.booleans(), st.integers(0, 4), _filters(), st.integers(0, 2)), max_size=40
)


@given(_operations, st.lists(_topics, min_size=1, max_size=8))
def test_the_index_routes_as_matching_every_filter_would(
    operations: list[tuple[bool, int, str, int]], published: list[str]
) -> None:
    """Any sequence of subscribes and unsubscribes over five sessions; for any topic (asked
    several times, so remembered answers are used too) the index gives each session whose
    filters match, once, at the highest QoS granted to a matching filter."""
    sessions = [Session(f"s{index}", clean=True) for index in range(5)]
    index = SubscriptionIndex()
    granted: dict[tuple[int, str], int] = {}
    for subscribe, who, topic_filter, qos in operations:
        if subscribe:
            index.add(topic_filter, sessions[who], qos)
            granted[(who, topic_filter)] = qos
        else:
            index.remove(topic_filter, sessions[who])
            granted.pop((who, topic_filter), None)
        for topic in published:
            expected: dict[Session, int] = {}
            for (whose, each), qos_granted in granted.items():
                if topic_matches(each, topic):
                    session = sessions[whose]
                    expected[session] = max(qos_granted, expected.get(session, -1))
            assert index.subscribers(topic) == expected
    assert len(index) == len({f for _, f in granted})


def test_a_zero_byte_retained_message_deletes_the_kept_one() -> None:
    """[MQTT-3.3.1-10] and [MQTT-3.3.1-11]: a retained message replaces the kept one; a
    zero-byte one deletes it; a wildcard SUBSCRIBE finds every kept topic it matches, and no
    `$` topic through a first-level wildcard [MQTT-4.7.2-1]."""
    retained = RetainedMessages()
    retained.keep("a/b", b"first", 1)
    retained.keep("a/b", b"second", 0)
    retained.keep("a/c", b"other", 2)
    retained.keep("$sys/x", b"system", 0)
    assert [(m.payload, q) for m, q in retained.matching("a/b")] == [(b"second", 0)]
    assert sorted(m.topic for m, _ in retained.matching("a/+")) == ["a/b", "a/c"]
    assert sorted(m.topic for m, _ in retained.matching("#")) == ["a/b", "a/c"]
    assert all(m.retain for m, _ in retained.matching("#"))
    retained.keep("a/b", b"", 1)
    assert "a/b" not in retained and len(retained) == 2
    assert retained.matching("a/b") == []

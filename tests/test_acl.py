import pytest

from broker import filter_covers, rights_for, topic_matches


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("devices/a/#", "devices/a/telemetry", True),
        ("devices/a/#", "devices/a", True),
        ("devices/+/telemetry", "devices/b/telemetry", True),
        ("devices/+/telemetry", "devices/b/commands", False),
        ("#", "$SYS/broker", False),
        ("devices/a", "devices/a/x", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("devices/a/#", "devices/a/#", True),
        ("devices/a/#", "devices/a/+/x", True),
        ("devices/a/#", "devices/#", False),
        ("devices/a/#", "devices/+/telemetry", False),
        ("devices/+/telemetry", "devices/b/telemetry", True),
        ("devices/+/telemetry", "devices/+/telemetry", True),
        ("devices/+/telemetry", "devices/+/#", False),
        ("devices/+/telemetry", "#", False),
        ("fleet/broadcast/#", "fleet/broadcast/ota/+", True),
    ],
)
def test_a_filter_is_granted_only_when_everything_it_matches_is_allowed(
    allowed: str, requested: str, expected: bool
) -> None:
    assert filter_covers(allowed, requested) is expected


def test_tiers_add_rights_in_order() -> None:
    bronze, silver, gold = (rights_for("d-1", tier) for tier in ("bronze", "silver", "gold"))
    assert bronze.may_publish("devices/d-1/telemetry") and not bronze.may_publish(
        "devices/d-2/telemetry"
    )
    assert bronze.may_subscribe("fleet/broadcast/#") and not bronze.may_subscribe(
        "devices/+/telemetry"
    )
    assert silver.may_subscribe("devices/+/telemetry") and not silver.may_publish(
        "fleet/broadcast/x"
    )
    assert gold.may_publish("fleet/broadcast/x") and gold.may_publish("devices/d-9/commands")
    assert not gold.may_subscribe("devices/#"), "even gold may not read every device's every topic"

import datetime as dt

import pytest

from fleet import UsageError, parse_duration, parse_instant, parse_positive_duration
from fleet.kernel.durations import format_duration

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("12h", 43200),
        ("90d", 90 * 86400),
        ("2w", 14 * 86400),
        (" 1.5h ", 5400),
    ],
)
def test_durations_in_every_unit(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "d", "10y", "ten days", "1d2h", "-"])
def test_malformed_durations_name_the_input_and_the_forms(text: str) -> None:
    with pytest.raises(UsageError, match=r"invalid duration .*s, m, h, d or w"):
        parse_duration(text)


def test_negative_durations_only_where_allowed() -> None:
    with pytest.raises(UsageError, match="must not be negative"):
        parse_duration("-2d")
    assert parse_duration("-2d", allow_negative=True) == dt.timedelta(days=-2)


def test_positive_duration_refuses_zero() -> None:
    with pytest.raises(UsageError, match="longer than zero"):
        parse_positive_duration("0s")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("-2d", NOW - dt.timedelta(days=2)),
        ("+1h", NOW + dt.timedelta(hours=1)),
        ("2026-01-31T12:00:00Z", dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)),
        ("2026-01-31T13:00:00+01:00", dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)),
        ("2026-01-31 12:00", dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)),
    ],
)
def test_instants(text: str, expected: dt.datetime) -> None:
    assert parse_instant(text, now=NOW) == expected


def test_malformed_instant() -> None:
    with pytest.raises(UsageError, match="invalid instant 'yesterday'"):
        parse_instant("yesterday", now=NOW)


@pytest.mark.parametrize("text", ["30s", "15m", "12h", "90d", "2w"])
def test_format_reads_back(text: str) -> None:
    assert format_duration(parse_duration(text)) == text

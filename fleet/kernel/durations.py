"""Parsing of the durations and instants the CLI accepts (``90d``, ``12h``, ``-2d``, ISO 8601)."""

from __future__ import annotations

import datetime as dt
import re

from fleet.kernel.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*([+-]?)\s*(\d{1,12}(?:\.\d{1,9})?)\s*([smhdw])\s*$")
MAX_DURATION = dt.timedelta(days=100 * 366)  # past the year 9999 no certificate can go


def parse_duration(text: str, *, allow_negative: bool = False) -> dt.timedelta:
    """Parse ``30s``, ``15m``, ``12h``, ``90d`` or ``2w`` into a timedelta.

    A leading ``-`` is accepted only with ``allow_negative``. Raises :class:`UsageError` with
    the accepted forms when ``text`` does not match.
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise UsageError(
            f"invalid duration {text!r}: use a number followed by s, m, h, d or w (e.g. 30s, 12h, 90d)"
        )
    sign, amount, unit = match.groups()
    if sign == "-" and not allow_negative:
        raise UsageError(f"invalid duration {text!r}: it must not be negative")
    seconds = float(amount) * _UNITS[unit]
    if seconds > MAX_DURATION.total_seconds():
        raise UsageError(f"invalid duration {text!r}: at most 100 years")
    return dt.timedelta(seconds=-seconds if sign == "-" else seconds)


def parse_positive_duration(text: str) -> dt.timedelta:
    """Parse a duration that must be longer than zero (a validity, an interval)."""
    value = parse_duration(text)
    if value <= dt.timedelta(0):
        raise UsageError(f"invalid duration {text!r}: it must be longer than zero")
    return value


def parse_instant(text: str, *, now: dt.datetime) -> dt.datetime:
    """Parse an instant: ``now``, a duration relative to ``now`` (``-2d``, ``+1h``), or ISO 8601.

    An ISO timestamp without a time zone is taken as UTC. The result is always UTC-aware.
    """
    stripped = text.strip()
    if stripped.lower() == "now":
        return now
    if _DURATION.fullmatch(stripped):
        return now + parse_duration(stripped, allow_negative=True)
    try:
        value = dt.datetime.fromisoformat(stripped)
    except ValueError:
        raise UsageError(
            f"invalid instant {text!r}: use 'now', a relative duration such as -2d or +1h, "
            "or an ISO 8601 timestamp such as 2026-01-31T12:00:00Z"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def format_duration(value: dt.timedelta) -> str:
    """Render a timedelta in the largest whole unit that ``parse_duration`` reads back."""
    seconds = int(value.total_seconds())
    for unit, size in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"

"""Reading an admin API request: a bounded JSON object whose fields are each read once with
their type checked (leftovers are errors), and the :class:`ApiError` that names the field."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fleet.kernel.bounded_json import JsonRejected, loads_bounded
from fleet.kernel.durations import parse_positive_duration
from fleet.kernel.errors import FleetError, UsageError
from fleet.kernel.identity import validate_device_id

MAX_BODY = 256 * 1024


class ApiError(FleetError):
    """A request the API refuses: HTTP ``status``, and the request ``field`` at fault."""

    def __init__(self, status: HTTPStatus, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class RequestBody:
    """A JSON object's fields, each read once with its type checked; leftovers are errors."""

    def __init__(self, raw: bytes, allowed: tuple[str, ...]) -> None:
        try:
            value = loads_bounded(raw or b"{}", max_bytes=MAX_BODY)
        except JsonRejected as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body was rejected: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                f"unknown field {unknown[0]!r}; valid fields: {', '.join(allowed)}",
                unknown[0],
            )
        self.values: dict[str, Any] = value

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.values.get(name, default)
        if value is not None and not isinstance(value, str):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r} must be a string", name)
        return value

    def required_text(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r} is required", name)
        return value

    def integer(self, name: str, default: int, *, maximum: int = 1_000_000) -> int:
        value = self.values.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r} must be an integer", name)
        if not 1 <= value <= maximum:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"field {name!r} must be from 1 to {maximum}", name
            )
        return value

    def identifier(self, name: str) -> str:
        """A required device id or claim name, validated whole."""
        return str(parse_field(name, validate_device_id, self.required_text(name)))

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.text(name, default) or default
        if value not in allowed:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"field {name!r} must be one of {', '.join(allowed)}", name
            )
        return value

    def flag(self, name: str) -> bool:
        value = self.values.get(name, False)
        if not isinstance(value, bool):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r} must be true or false", name)
        return value

    def duration(self, name: str) -> dt.timedelta | None:
        text = self.text(name)
        return parse_field(name, parse_positive_duration, text) if text is not None else None


def parse_field(name: str, parse: Callable[[str], Any], text: str) -> Any:
    """``parse(text)``, with its UsageError turned into a 400 naming ``name``."""
    try:
        return parse(text)
    except UsageError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name!r}: {exc}", name) from exc

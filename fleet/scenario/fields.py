"""The pieces a scenario file is read with: YAML that keeps line numbers, errors that name
file, line and field, and field converters (durations, counts, choices …).

Every error of a file is reported at once: :func:`note_error` keeps an error for the file's
report while :func:`load_scenario <fleet.scenario.loader.load_scenario>` collects them, and
:func:`reading_on` notes the error of one block (a group, a step) and goes on after it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from broker.policy import PolicyError, load_policy
from fleet.kernel.durations import parse_duration
from fleet.kernel.errors import UsageError
from fleet.kernel.identity import validate_device_id
from fleet.kernel.lined_yaml import (
    FileFormatError,
    LinedMap,
    LinedSeq,
    parse_lined_yaml,
    suggest,
)
from fleet.kernel.tls import KNOWN_GROUPS, canonical_group, parse_groups

T = TypeVar("T")


class ScenarioError(FileFormatError):
    """A scenario file that cannot run as written; the message says where and why."""


class ScenarioErrors(ScenarioError):
    """Several errors, of one file or several, all reported at once (in file and line order);
    ``path``, ``line`` and ``where`` are the first one's."""

    def __init__(self, errors: Iterable[ScenarioError]) -> None:
        self.errors = sorted(errors, key=lambda e: (str(e.path), e.line))
        first = self.errors[0]
        self.path, self.line, self.where = first.path, first.line, first.where
        UsageError.__init__(
            self, "\n".join(str(e) for e in self.errors) + f"\n({len(self.errors)} errors)"
        )


def one_or_all(errors: list[ScenarioError]) -> ScenarioError:
    return errors[0] if len(errors) == 1 else ScenarioErrors(errors)


# The errors of the file being read, while one is (see :func:`load_scenario`).
_noted: contextvars.ContextVar[list[ScenarioError] | None] = contextvars.ContextVar(
    "scenario_errors", default=None
)


def note_error(error: ScenarioError) -> None:
    """Keep ``error`` to report with the file's others, or raise it when nothing collects."""
    noted = _noted.get()
    if noted is None:
        raise error
    noted.append(error)


class AlreadyReported(Exception):
    """A step names a group whose own error is already noted: nothing more to say."""


@contextlib.contextmanager
def reading_on() -> Iterator[None]:
    """Note an error raised inside and go on after the block (one group, one step …)."""
    try:
        yield
    except ScenarioError as error:
        note_error(error)
    except AlreadyReported:
        pass


# -- YAML with line numbers (fleet.kernel.lined_yaml) ----------------------------------------


def parse_yaml(path: Path, text: str) -> LinedMap:
    return parse_lined_yaml(
        path,
        text,
        error=ScenarioError,
        empty="empty: a scenario needs name, fleet and steps",
        not_a_mapping="a scenario is a mapping of name, fleet, steps ...",
    )


# -- field access with errors that point at the file -----------------------------------------


class Fields:
    """One mapping of the file, read field by field; unknown fields are errors."""

    def __init__(self, path: Path, mapping: LinedMap, where: str, allowed: Iterable[str]) -> None:
        self.path, self.mapping, self.where = path, mapping, where
        allowed = tuple(allowed)
        for key in mapping:
            if key not in allowed:
                note_error(
                    ScenarioError(
                        path,
                        mapping.lines[key],
                        where,
                        f"unknown field {key!r}{suggest(key, allowed)}; "
                        f"valid fields: {', '.join(allowed)}",
                    )
                )

    def line(self, key: str | None = None) -> int:
        return self.mapping.lines.get(key, self.mapping.line) if key else self.mapping.line

    def error(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(self.path, self.line(key), f"{self.where}.{key}", problem)

    def has(self, key: str) -> bool:
        return key in self.mapping

    def get(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        """The field's value, or ``default`` when it is absent (or wrong: the error is noted)."""
        if key not in self.mapping:
            return default
        try:
            return self.required(key, convert)
        except ScenarioError as error:
            note_error(error)
            return default

    def required(self, key: str, convert: Callable[[Any], T]) -> T:
        if key not in self.mapping:
            raise ScenarioError(self.path, self.line(), self.where, f"missing field {key!r}")
        try:
            return convert(self.mapping[key])
        except (ValueError, TypeError, UsageError) as exc:
            raise self.error(key, str(exc)) from None


def as_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected text")
    return value.strip()


def as_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0, got {value!r}")
    return value


def as_positive_count(value: Any) -> int:
    if as_count(value) < 1:
        raise ValueError("expected a whole number >= 1")
    return int(value)


def as_flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _seconds(value: Any, *, allow_negative: bool = False) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(value, allow_negative=allow_negative).total_seconds()
    else:
        raise ValueError(f"expected a duration such as 500ms, 2s or 1m, got {value!r}")
    if seconds < 0 and not allow_negative:
        raise ValueError("a duration here must not be negative")
    return seconds


def as_duration(value: Any) -> float:
    if isinstance(value, str) and value.strip().endswith("ms"):
        try:
            return float(value.strip()[:-2]) / 1000
        except ValueError:
            raise ValueError(f"invalid duration {value!r}") from None
    return _seconds(value)


def as_positive_duration(value: Any) -> float:
    seconds = as_duration(value)
    if seconds <= 0:
        raise ValueError("the duration must be longer than zero")
    return seconds


def as_signed_duration(value: Any) -> float:
    return _seconds(value, allow_negative=True)


def as_rate(value: Any) -> float:
    text = str(value).strip()
    number = text[:-2] if text.endswith("/s") else text
    try:
        rate = float(number)
    except ValueError:
        raise ValueError(f"expected a rate such as 200/s, got {value!r}") from None
    if rate <= 0:
        raise ValueError("the rate must be positive")
    return rate


def one_of(choices: Iterable[str]) -> Callable[[Any], str]:
    options = tuple(str(choice) for choice in choices)

    def convert(value: Any) -> str:
        text = str(value).strip()
        if text not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}{suggest(text, options)}")
        return text

    return convert


def as_qos(value: Any) -> int:
    if value not in (0, 1):
        raise ValueError("expected 0 or 1")
    return int(value)


def as_sequence(value: Any) -> LinedSeq:
    if not isinstance(value, LinedSeq):
        raise ValueError("expected a list")
    return value


def as_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError("expected a fraction of the lifetime between 0 and 1, e.g. 0.66")
    return float(value)


def as_groups(value: Any) -> tuple[str, ...]:
    """Key-exchange groups, preferred first: a list, or one comma-separated string."""
    if isinstance(value, LinedSeq):
        text = ",".join(as_text(item) for item in value)
    else:
        text = as_text(value)
    try:
        return parse_groups(text)
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def as_group(value: Any) -> str:
    """One negotiated key-exchange group, as OpenSSL reports it (``P-256`` → ``secp256r1``)."""
    text = as_text(value)
    group = canonical_group(text)
    if group is None:
        raise ValueError(
            f"{text!r} is not a key-exchange group{suggest(text, KNOWN_GROUPS)}: one of "
            + ", ".join(KNOWN_GROUPS)
        )
    return group


def as_group_name(value: Any) -> str:
    name = as_text(value)
    validate_device_id(f"{name}-1")
    if "#" in name:
        raise ValueError("a group name cannot contain '#'")
    return name


@contextlib.contextmanager
def collecting_errors() -> Iterator[list[ScenarioError]]:
    """Collect what :func:`note_error` is given inside the block (one file's errors)."""
    errors: list[ScenarioError] = []
    token = _noted.set(errors)
    try:
        yield errors
    finally:
        _noted.reset(token)


def policy_file(scenario: Path, value: Any) -> Path:
    """An access policy file named relative to the scenario file, read and checked now."""
    path = (scenario.parent / as_text(value)).resolve()
    try:
        load_policy(path)
    except PolicyError as exc:
        raise ValueError(str(exc)) from None
    return path

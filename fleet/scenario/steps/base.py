"""What every scenario step is, and the registry of step kinds.

A step kind is one class: its name in scenario files (``kind``), its fields, how it is read
from its mapping (:meth:`Step.read`, errors naming file, line and field) and what it does in a
run (:meth:`Step.run`). Defining the class registers it (:data:`STEPS`); ``run`` is abstract,
so a kind without one cannot be built: mypy says so where ``read`` builds it by name (each
``read`` names its class rather than ``cls`` for that reason).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fleet.kernel.lined_yaml import LinedMap, suggest
from fleet.scenario.fields import (
    AlreadyReported,
    Fields,
    ScenarioError,
)
from fleet.scenario.model import Group, Selector

if TYPE_CHECKING:
    from fleet.scenario.runner import ScenarioRun
    from fleet.scenario.steps.checks import ExpectStep

# Every step kind by its name in scenario files (filled as the step modules are imported).
STEPS: dict[str, type[Step]] = {}

_SELECTOR = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:#(\d+)(?:-(\d+))?)?$")


@dataclass(frozen=True, slots=True)
class Step(abc.ABC):
    """One step of a scenario; ``line`` is where the file wrote it."""

    kind: ClassVar[str]  # its name in scenario files: "revoke"
    fields: ClassVar[tuple[str, ...]] = ()  # the fields its mapping may hold
    shorthand: ClassVar[str | None] = None  # the field a bare value stands for
    embedded_only: ClassVar[bool] = False  # acts on the embedded broker: not with --target
    observes: ClassVar[bool] = False  # only looks (expect, wait): opens no new window

    line: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # not super(): dataclass(slots=True) rebuilt Step, and the method's cell holds the old one
        super(Step, cls).__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is None:
            return
        known = STEPS.get(kind)
        # dataclass(slots=True) builds the class twice: the second one replaces the first
        same = known is not None and (known.__module__, known.__name__) == (
            cls.__module__,
            cls.__name__,
        )
        if known is not None and not same:
            raise TypeError(f"step kind {kind!r} is defined twice ({known.__name__})")
        STEPS[kind] = cls

    @classmethod
    @abc.abstractmethod
    def read(cls, reader: StepReader, fields: Fields, line: int) -> Step:
        """The step, built from its checked fields (raise or note a :class:`ScenarioError`)."""

    @abc.abstractmethod
    async def run(self, run: ScenarioRun) -> None:
        """Do it, and note on the run's timeline what was done."""

    def disrupts(self) -> Selector | None:
        """The devices this step is meant to affect (``others_unaffected`` leaves them out)."""
        return None

    def expectation(self) -> ExpectStep | None:
        """The expectation this step checks, if it checks one."""
        return None

    def waits_seconds(self) -> float:
        """Seconds the step waits by design (the scenario's expected length adds them up)."""
        return 0.0


def step_kinds() -> tuple[str, ...]:
    """The names of every step kind, in alphabetical order."""
    return tuple(sorted(STEPS))


class StepReader:
    """Reads the steps of one file in order, with what the earlier steps did: which groups
    are provisioned (and on which line), which members are revoked."""

    def __init__(self, path: Path, groups: dict[str, Group], broken: set[str]) -> None:
        self.path, self.groups, self.broken = path, groups, broken
        # groups that enroll or hold a claim exist from the start: nothing to provision
        self.provisioned: dict[str, int] = {n: 0 for n, g in groups.items() if not g.provisioned}
        self.revoked: dict[tuple[str, int], int] = {}  # (group, member) -> line of its revoke

    def read(self, item: Any, line: int, where: str) -> Step:
        kinds = step_kinds()
        if not isinstance(item, LinedMap) or len(item) != 1:
            raise ScenarioError(
                self.path,
                line,
                where,
                f"a step is a mapping with one step name, one of: {', '.join(kinds)}",
            )
        kind, body = next(iter(item.items()))
        step_class = STEPS.get(kind)
        if step_class is None:
            raise ScenarioError(
                self.path,
                line,
                where,
                f"unknown step {kind!r}{suggest(kind, kinds)}; steps: {', '.join(kinds)}",
            )
        where = f"{where}.{kind}"
        if body is None:
            body = LinedMap.of(line)
        if not isinstance(body, LinedMap):
            if step_class.shorthand is None:
                raise ScenarioError(self.path, line, where, "expected a mapping of fields")
            body = LinedMap.of(line, {step_class.shorthand: body})
        fields = Fields(self.path, body, where, step_class.fields)
        return step_class.read(self, fields, line)

    # selectors ---------------------------------------------------------------------------

    def devices(self, fields: Fields) -> Selector:
        """The step's required ``devices``."""
        selector = self.selector(fields)
        if selector is None:
            raise ScenarioError(self.path, fields.line(), fields.where, "missing field 'devices'")
        return selector

    def selector(self, fields: Fields, key: str = "devices") -> Selector | None:
        """The devices a step names, checked against the groups; None when not given."""
        if not fields.has(key):
            return None
        value = fields.mapping[key]
        items = value if isinstance(value, list) else [value]
        refs: list[tuple[str, int | None, int | None]] = []
        for item in items:
            text = str(item).strip()
            match = _SELECTOR.fullmatch(text)
            if match is None:
                raise fields.error(
                    key, f"{text!r} is not a group or a member such as sensors#3 or sensors#2-5"
                )
            group_name, first, last = match.group(1), match.group(2), match.group(3)
            group = self.groups.get(group_name)
            if group is None and group_name in self.broken:
                raise AlreadyReported
            if group is None:
                raise fields.error(
                    key, f"no group {group_name!r}{suggest(group_name, self.groups)}"
                )
            if group_name not in self.provisioned:
                raise fields.error(key, f"group {group_name!r} is used before its provision step")
            lo = int(first) if first else None
            hi = int(last) if last else lo
            if lo is not None and hi is not None and not 1 <= lo <= hi <= group.count:
                raise fields.error(
                    key, f"{text!r}: members of {group_name!r} are numbered 1 to {group.count}"
                )
            refs.append((group_name, lo, hi))
        return Selector(tuple(refs), ", ".join(str(i) for i in items))

    def members(self, selector: Selector) -> Iterator[tuple[str, int]]:
        """Every (group, member number) ``selector`` names."""
        for group_name, lo, hi in selector.refs:
            first, last = (lo, hi) if lo is not None and hi is not None else (1, None)
            for number in range(first, (last or self.groups[group_name].count) + 1):
                yield group_name, number

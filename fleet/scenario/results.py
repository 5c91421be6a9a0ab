"""What a scenario run reports: its timeline, its expectations' verdicts with evidence, its
message counts, and its status; and the broker a run targets when it is not ours."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Target:
    """A broker that is not ours to start: ``--target mqtts://HOST:PORT``."""

    host: str
    port: int
    server_name: str | None = "localhost"


@dataclass
class TimelineEntry:
    at_ms: int
    line: int
    kind: str
    text: str


@dataclass
class ExpectationResult:
    line: int
    kind: str
    text: str
    passed: bool
    observed: str
    at_ms: int
    failures: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)


@dataclass
class ScenarioResult:
    name: str
    path: str
    status: str  # passed, failed, skipped, error
    reason: str = ""
    seconds: float = 0.0
    timeline: list[TimelineEntry] = field(default_factory=list)
    expectations: list[ExpectationResult] = field(default_factory=list)
    messages: dict[str, dict[str, int]] = field(default_factory=dict)  # per group
    connections_per_second: list[int] = field(default_factory=list)
    workspace: str | None = None
    traceback: str | None = None  # when the run itself failed (a defect, not a verdict)

    @property
    def passed(self) -> bool:
        return self.status in ("passed", "skipped")


# ("step", TimelineEntry), ("expectation", ExpectationResult), ("status", text or None: cleared)
Listener = Callable[[str, object], None]

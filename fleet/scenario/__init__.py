"""Scenario engine: scripted stories about a fleet, replayed for real, with verdicts.

``load_scenarios`` checks files before anything runs; ``run_scenarios`` replays them (each in
a fresh workspace with an embedded broker, or against a ``Target``) and returns one
:class:`ScenarioResult` each. The CLI (``fleet scenario``) is a thin layer over this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from fleet.scenario.loader import ScenarioError, load_scenario, load_scenarios
from fleet.scenario.model import Scenario
from fleet.scenario.runner import (
    ExpectationResult,
    Listener,
    ScenarioResult,
    ScenarioRun,
    Target,
    TimelineEntry,
    skip_reason,
)

LIBRARY = Path(__file__).resolve().parents[2] / "scenarios"


def run_scenarios(
    scenarios: list[Scenario],
    *,
    target: Target | None = None,
    workspace_dir: Path | None = None,
    keep_workspace: bool = False,
    listener: Listener | None = None,
    on_result: Callable[[ScenarioResult], None] | None = None,
) -> list[ScenarioResult]:
    """Run each scenario in turn (one event loop each) and return the results in order."""
    results = []
    for scenario in scenarios:
        run = ScenarioRun(
            scenario,
            target=target,
            workspace_dir=workspace_dir,
            keep_workspace=keep_workspace,
            listener=listener,
        )
        result = asyncio.run(run.run())
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


__all__ = [
    "LIBRARY",
    "ExpectationResult",
    "Scenario",
    "ScenarioError",
    "ScenarioResult",
    "ScenarioRun",
    "Target",
    "TimelineEntry",
    "load_scenario",
    "load_scenarios",
    "run_scenarios",
    "skip_reason",
]

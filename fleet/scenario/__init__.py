"""Scenario engine: scripted stories about a fleet, replayed for real, with verdicts.

``load_scenarios`` checks files before anything runs; ``run_scenarios`` replays them (each in
a fresh workspace with an embedded broker, or against a ``Target``) and returns one
:class:`ScenarioResult` each. The CLI (``fleet scenario``) is a thin layer over this.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from fleet.kernel.errors import UsageError
from fleet.scenario.fields import ScenarioError, ScenarioErrors
from fleet.scenario.loader import load_scenario, load_scenarios
from fleet.scenario.model import Scenario
from fleet.scenario.results import (
    ExpectationResult,
    Listener,
    ScenarioResult,
    Target,
    TimelineEntry,
)
from fleet.scenario.runner import ScenarioRun, skip_reason
from fleet.scenario.steps import STEPS

LIBRARY = Path(__file__).resolve().parents[2] / "scenarios"


def run_scenarios(
    scenarios: list[Scenario],
    *,
    target: Target | None = None,
    workspace_dir: Path | None = None,
    keep_workspace: bool = False,
    listener: Listener | None = None,
    on_result: Callable[[ScenarioResult], None] | None = None,
    jobs: int = 1,
) -> list[ScenarioResult]:
    """Run the scenarios and return their results in order: one after another (one event loop
    each), or ``jobs`` at a time, each in a process of its own with its own fresh workspace and
    embedded broker (``on_result`` then sees them as they finish; ``listener`` sees nothing)."""
    if jobs > 1 and len(scenarios) > 1:
        if target is not None or workspace_dir is not None:
            raise UsageError(
                "--jobs runs each scenario in a fresh workspace of its own; with --target or "
                "--dir they share one and run one after another (leave --jobs out)"
            )
        return _run_in_processes(scenarios, keep_workspace, on_result, jobs)
    results = []
    for scenario in scenarios:
        result = _run_one(scenario, target, workspace_dir, keep_workspace, listener)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _run_one(
    scenario: Scenario,
    target: Target | None,
    workspace_dir: Path | None,
    keep_workspace: bool,
    listener: Listener | None = None,
) -> ScenarioResult:
    run = ScenarioRun(
        scenario,
        target=target,
        workspace_dir=workspace_dir,
        keep_workspace=keep_workspace,
        listener=listener,
    )
    return asyncio.run(run.run())


def _run_in_processes(
    scenarios: list[Scenario],
    keep_workspace: bool,
    on_result: Callable[[ScenarioResult], None] | None,
    jobs: int,
) -> list[ScenarioResult]:
    # spawn, not fork: a fresh interpreter per worker, nothing inherited from this one's threads
    context = multiprocessing.get_context("spawn")
    results: dict[int, ScenarioResult] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        # the longest first, so that the short ones fill the gaps at the end
        order = sorted(range(len(scenarios)), key=lambda i: -_expected_seconds(scenarios[i]))
        futures = {
            pool.submit(_run_one, scenarios[i], None, None, keep_workspace): i for i in order
        }
        for future in as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            if on_result is not None:
                on_result(result)
    return [results[i] for i in range(len(scenarios))]


def _expected_seconds(scenario: Scenario) -> float:
    """A rough cost: its devices and its waits (to start the long ones first)."""
    devices = sum(group.count for group in scenario.groups)
    waits = sum(step.waits_seconds() for step in scenario.steps)
    return devices / 200 + waits


__all__ = [
    "LIBRARY",
    "STEPS",
    "ExpectationResult",
    "Scenario",
    "ScenarioError",
    "ScenarioErrors",
    "ScenarioResult",
    "ScenarioRun",
    "Target",
    "TimelineEntry",
    "load_scenario",
    "load_scenarios",
    "run_scenarios",
    "skip_reason",
]

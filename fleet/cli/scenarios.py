"""``fleet scenario list|run``: the scenario library, checked and replayed with verdicts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fleet.cli.support import (
    friendly_errors,
    out,
)
from fleet.kernel.errors import UsageError

scenario_app = typer.Typer(
    help="Replay scripted scenarios (expiry, revocation, rotation, rogue brokers ...) with verdicts.",
    no_args_is_help=True,
)


@scenario_app.command("list")
@friendly_errors
def scenario_list(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Files or directories (default: the library).")
    ] = None,
) -> None:
    """Show the scenarios of the library (or of PATHS), checked, with what each needs."""
    from fleet.scenario import LIBRARY, load_scenarios

    scenarios = load_scenarios(paths or [LIBRARY])
    # the file column only when a file is not simply <name>.yaml: it would repeat the name
    files = any(s.path.name != f"{s.name}.yaml" for s in scenarios)
    table = Table(header_style="bold")
    table.add_column("scenario", no_wrap=True)
    if files:
        table.add_column("file", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("devices", justify="right", no_wrap=True)
    table.add_column("description", ratio=1, min_width=24)
    for s in scenarios:
        devices = sum(g.count for g in s.groups if g.clone_of is None)
        needs = (
            f" [yellow](needs the mtls-fleet broker: {s.broker.needs_fleet_broker})[/]"
            if s.broker.needs_fleet_broker
            else ""
        )
        cells = [s.name, *([s.path.name] if files else []), str(len(s.steps)), str(devices)]
        table.add_row(*cells, s.description + needs)
    out.print(table)


@scenario_app.command("run")
@friendly_errors
def scenario_run(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Scenario files or directories (default: the whole library)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="mqtts://HOST:PORT of a broker that trusts --dir's CA (default: embedded)."
        ),
    ] = None,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Workspace to use (required with --target; default: a fresh one per scenario).",
        ),
    ] = None,
    server_name: Annotated[
        str, typer.Option(help="Host name the target's certificate must carry.")
    ] = "localhost",
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here (for CI).")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON.")
    ] = None,
    keep_workspace: Annotated[
        bool, typer.Option(help="Keep each scenario's workspace (for inspection).")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No live timeline, only the verdicts.")] = False,
    skip_tag: Annotated[
        list[str] | None,
        typer.Option(help="Leave out scenarios with this tag, e.g. long (repeatable)."),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Run this many scenarios at once, each in its own process, workspace and "
            "embedded broker (no live timeline).",
        ),
    ] = 1,
) -> None:
    """Run scenarios; exit 0 only when every expectation of every scenario held."""
    from fleet.cli.swarm import parse_target
    from fleet.scenario import LIBRARY, ScenarioResult, Target, load_scenarios, run_scenarios
    from fleet.scenario.report import (
        LiveTimeline,
        print_result,
        print_summary,
        write_json,
        write_junit,
    )

    scenarios = load_scenarios(paths or [LIBRARY])  # every file is checked before any runs
    skipped = set(skip_tag or ())
    scenarios = [s for s in scenarios if not skipped & set(s.tags)]
    chosen_target = None
    if target is not None:
        if directory is None:
            raise UsageError(
                "--target needs --dir: the workspace whose CA the target broker trusts"
            )
        host, port = parse_target(target)
        chosen_target = Target(host, port, server_name)
    live = LiveTimeline(out, quiet=quiet)

    def announce(result: ScenarioResult) -> None:
        print_result(result, out)
        out.print()

    for_each = [s.name for s in scenarios]
    out.print(f"running {len(for_each)} scenario(s): {', '.join(for_each)}")
    results = []
    started = time.monotonic()
    if jobs > 1 and len(scenarios) > 1:
        out.print(f"{jobs} at a time, each in its own process: verdicts as they finish")

        def announce_with_title(result: ScenarioResult) -> None:
            out.rule(result.name)
            announce(result)

        results = run_scenarios(
            scenarios,
            target=chosen_target,
            workspace_dir=directory.resolve() if directory else None,
            keep_workspace=keep_workspace,
            on_result=announce_with_title,
            jobs=jobs,
        )
    for scenario in scenarios if not results else ():
        out.rule(
            f"{scenario.name} — {scenario.description}" if scenario.description else scenario.name
        )
        results += run_scenarios(
            [scenario],
            target=chosen_target,
            workspace_dir=directory.resolve() if directory else None,
            keep_workspace=keep_workspace,
            listener=live,
            on_result=announce,
        )
    print_summary(results, out, wall_seconds=time.monotonic() - started if jobs > 1 else None)
    if junit is not None:
        write_junit(results, junit)
        out.print(f"wrote {junit}")
    if json_out is not None:
        write_json(results, json_out)
        out.print(f"wrote {json_out}")
    if not all(r.passed for r in results):
        raise typer.Exit(1)

"""Scenario reports: the live timeline, the verdict tables, JSON for tools and JUnit XML for CI."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from fleet.scenario.results import ExpectationResult, ScenarioResult, TimelineEntry

_STATUS_STYLE = {"passed": "green", "failed": "red", "error": "red", "skipped": "yellow"}
_BARS = " ▁▂▃▄▅▆▇█"


class LiveTimeline:
    """Prints each step and expectation as it happens (a listener for :class:`ScenarioRun`)."""

    def __init__(self, console: Console, *, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self._status: Status | None = None  # what an expectation is waiting for, live

    def __call__(self, kind: str, item: object) -> None:
        if self.quiet:
            return
        if kind == "status":
            self._show_status(item if isinstance(item, str) else None)
        elif isinstance(item, TimelineEntry):
            where = f"line {item.line:<3}" if item.line else "        "
            self.console.print(
                f"  [dim]{item.at_ms:>7} ms[/] {where} [bold]{item.kind}[/] {escape(item.text)}"
            )
        elif isinstance(item, ExpectationResult):
            mark = "[green]✔[/]" if item.passed else "[red]✘[/]"
            self.console.print(
                f"  [dim]{item.at_ms:>7} ms[/] line {item.line:<3} {mark} {item.kind} "
                f"{escape(item.text)} [dim]→ {escape(item.observed)}[/]"
            )

    def _show_status(self, text: str | None) -> None:
        if text is None:
            if self._status is not None:
                self._status.stop()
                self._status = None
            return
        if self._status is None:
            self._status = self.console.status(escape(text))
            self._status.start()
        else:
            self._status.update(escape(text))


def sparkline(values: list[int]) -> str:
    if not values:
        return ""
    top = max(values) or 1
    return "".join(_BARS[round(v / top * (len(_BARS) - 1))] for v in values)


def print_result(result: ScenarioResult, console: Console) -> None:
    style = _STATUS_STYLE[result.status]
    reason = f": {escape(result.reason)}" if result.reason else ""
    console.print(
        f"[bold {style}]{result.status.upper()}[/] {result.name} "
        f"({result.path}, {result.seconds:.1f} s){reason}"
    )
    if result.expectations:
        table = Table(show_header=True, header_style="bold", expand=False)
        table.add_column("line", justify="right")
        table.add_column("expected")
        table.add_column("observed")
        table.add_column("at", justify="right")
        table.add_column("")
        for e in result.expectations:
            mark = "[green]pass[/]" if e.passed else "[red]FAIL[/]"
            observed = escape(e.observed)
            if e.unchecked:
                observed += f"\n[yellow]not checked: {escape('; '.join(e.unchecked))}[/]"
            table.add_row(str(e.line), escape(e.text), observed, f"{e.at_ms} ms", mark)
        console.print(table)
    for e in result.expectations:
        if e.passed:
            continue
        console.print(f"[red]line {e.line}: expected {escape(e.text)}[/]")
        for failure in e.failures:
            console.print(f"    {escape(failure)}")
        if e.evidence:
            console.print("    evidence:")
            for line in e.evidence:
                console.print(f"      [dim]{escape(line)}[/]")
    if result.messages:
        shown = "; ".join(
            f"{group}: {m['sent']} sent, {m['acknowledged']} acked, {m['connections']} sessions, {m['drops']} drops"
            for group, m in result.messages.items()
        )
        console.print(f"  messages: {shown}")
    if len(result.connections_per_second) > 1:
        console.print(
            f"  connections/s: {sparkline(result.connections_per_second)} "
            f"(peak {max(result.connections_per_second)}/s)"
        )
    if result.traceback:
        console.print(f"[red]{escape(result.traceback)}[/]")
    if result.workspace:
        console.print(f"  workspace kept: {result.workspace}")


def print_summary(
    results: list[ScenarioResult], console: Console, *, wall_seconds: float | None = None
) -> None:
    table = Table(title="scenarios", header_style="bold")
    table.add_column("scenario")
    table.add_column("result")
    table.add_column("expectations", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("why")
    for r in results:
        passed = sum(e.passed for e in r.expectations)
        table.add_row(
            r.name,
            f"[{_STATUS_STYLE[r.status]}]{r.status}[/]",
            f"{passed}/{len(r.expectations)}",
            f"{r.seconds:.1f}",
            escape(r.reason),
        )
    console.print(table)
    total = sum(r.seconds for r in results)
    wall = f" ({wall_seconds:.1f} s from first to last)" if wall_seconds is not None else ""
    console.print(f"{len(results)} scenarios in {total:.1f} s{wall}")


def write_json(results: list[ScenarioResult], path: Path) -> None:
    document = {
        "passed": all(r.passed for r in results),
        "scenarios": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_junit(results: list[ScenarioResult], path: Path) -> None:
    suite = ET.Element(
        "testsuite",
        name="mtls-fleet scenarios",
        tests=str(len(results)),
        failures=str(sum(r.status == "failed" for r in results)),
        errors=str(sum(r.status == "error" for r in results)),
        skipped=str(sum(r.status == "skipped" for r in results)),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname="scenarios",
            name=r.name,
            file=r.path,
            time=f"{r.seconds:.3f}",
        )
        if r.status == "skipped":
            ET.SubElement(case, "skipped", message=r.reason)
        elif r.status in ("failed", "error"):
            element = "failure" if r.status == "failed" else "error"
            node = ET.SubElement(case, element, message=r.reason)
            node.text = (
                "\n".join(
                    f"line {e.line}: expected {e.text}; observed {e.observed}\n"
                    + "\n".join(f"  {f}" for f in e.failures)
                    + ("\n" + "\n".join(f"  {x}" for x in e.evidence) if e.evidence else "")
                    for e in r.expectations
                    if not e.passed
                )
                or r.reason
            )
        out = ET.SubElement(case, "system-out")
        out.text = "\n".join(
            [f"{t.at_ms} ms line {t.line} {t.kind} {t.text}" for t in r.timeline]
            + [
                f"{e.at_ms} ms line {e.line} {'pass' if e.passed else 'FAIL'} {e.kind} {e.text} -> {e.observed}"
                for e in r.expectations
            ]
        )
    ET.indent(suite)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)

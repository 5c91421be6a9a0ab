"""What ``fleet bench handshake`` prints and writes: tables, report.json, PNG plots, comparisons."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from device.handshake_bench import PHASES, BenchResult
from fleet.kernel.errors import UsageError

_BARS = " ▁▂▃▄▅▆▇█"
_PERCENTILES = ("p50", "p90", "p99", "p99.9", "max")


def sparkline(values: list[int]) -> str:
    top = max(values, default=0) or 1
    return "".join(_BARS[round(v / top * (len(_BARS) - 1))] for v in values)


def _count(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def _shares(counts: dict[str, int]) -> str:
    return ", ".join(f"{escape(name)} {n:,}" for name, n in counts.items()) or "-"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def print_result(result: BenchResult, console: Console, *, reference: float | None = None) -> None:
    table = Table(title=f"handshake churn against {result.settings['target']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    failures = result.attempts - result.accepted
    table.add_row("attempts", f"{result.attempts:,} ({result.processes} process(es))")
    table.add_row("accepted", f"{result.accepted:,}")
    table.add_row("refused or failed", f"{failures:,}")
    table.add_row("handshakes/s (accepted)", f"{result.rate:,.0f}")
    table.add_row("attempts/s", f"{result.attempt_rate:,.0f}")
    table.add_row("client CPU per attempt", f"{result.cpu_seconds_per_handshake * 1000:.2f} ms")
    if result.broker_cpu_seconds_per_handshake is not None:
        table.add_row(
            "broker CPU per attempt",
            f"{result.broker_cpu_seconds_per_handshake * 1000:.2f} ms (the embedded broker)",
        )
    table.add_row(
        "bytes on the wire per handshake", f"{_count(result.bytes_per_handshake)} (TLS records)"
    )
    table.add_row(
        "key exchange · broker's signature",
        f"{_shares(result.groups)} · {_shares(result.broker_signatures)}",
    )
    if result.full is not None:
        ratio = result.rate / result.full["rate"] if result.full["rate"] else float("nan")
        table.add_row(
            "TLS session resumption",
            f"{result.resumed:,} resumed: {result.rate:,.0f}/s vs {result.full['rate']:,.0f}/s "
            f"full handshakes ({ratio:.2f}x)",
        )
    if reference is not None:
        table.add_row(
            "openssl s_time -new (same target)",
            f"{reference:,.0f}/s: our attempts/s are {result.attempt_rate / reference:.0%} of it"
            if reference
            else "no figure",
        )
    if result.per_second:
        table.add_row("attempts per second", f"{sparkline(result.per_second)} {result.per_second}")
    console.print(table)
    latency = Table(title="latency (ms)", header_style="bold")
    latency.add_column("phase")
    for p in _PERCENTILES:
        latency.add_column(p, justify="right")
    for phase in PHASES:
        values = result.latency_ms[phase]
        latency.add_row(phase, *(_ms(values[p]) for p in _PERCENTILES))
    console.print(latency)
    if len(result.outcomes) > 1 or result.by_expectation.keys() - {"accepted -> accepted"}:
        outcomes = Table(title="outcomes", header_style="bold")
        outcomes.add_column("outcome")
        outcomes.add_column("count", justify="right")
        for outcome, count in result.outcomes.items():
            outcomes.add_row(escape(outcome), f"{count:,}")
        for pair, count in result.by_expectation.items():
            outcomes.add_row(f"identity {escape(pair)}", f"{count:,}")
        console.print(outcomes)


def saturation(results: list[BenchResult]) -> int | None:
    """The concurrency beyond which more in flight adds less than 10% throughput."""
    for current, following in itertools.pairwise(results):
        if following.rate < current.rate * 1.10:
            return int(current.settings["concurrency"])
    return None


def print_sweep(results: list[BenchResult], console: Console) -> None:
    table = Table(title="concurrency sweep", header_style="bold")
    for column in ("concurrency", "handshakes/s", "p50 ms", "p99 ms", "CPU ms/attempt"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.settings["concurrency"]),
            f"{r.rate:,.0f}",
            _ms(r.latency_ms["total"]["p50"]),
            _ms(r.latency_ms["total"]["p99"]),
            f"{r.cpu_seconds_per_handshake * 1000:.2f}",
        )
    console.print(table)
    point = saturation(results)
    console.print(
        f"throughput saturates at concurrency {point}"
        if point is not None
        else "throughput still grows at the highest concurrency tried"
    )


# -- report.json and plots ---------------------------------------------------------------------


def report_document(
    results: list[BenchResult], *, sweep: bool, reference: float | None
) -> dict[str, Any]:
    main = results[-1]
    return {
        "runs": [asdict(r) for r in results],
        "sweep": {
            "parameter": "concurrency",
            "values": [r.settings["concurrency"] for r in results],
            "saturates_at": saturation(results),
        }
        if sweep
        else None,
        "reference": {
            "tool": "openssl s_time -new",
            "rate": reference,
            "ratio": main.attempt_rate / reference if reference else None,
        }
        if reference is not None
        else None,
    }


def write_report(
    out_dir: Path, results: list[BenchResult], *, sweep: bool, reference: float | None
) -> list[Path]:
    """Write report.json and the PNG plots; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json"]
    document = report_document(results, sweep=sweep, reference=reference)
    written[0].write_text(json.dumps(document, indent=2) + "\n")
    main = results[-1]

    import numpy as np

    figure, axes = plt.subplots(figsize=(8, 4.5))
    recorded = [v for phase in PHASES for v, _ in main.histogram_ms[phase]]
    if recorded:
        edges = np.logspace(np.log10(min(recorded)), np.log10(max(recorded) * 1.01), 60)
        for phase in PHASES:
            buckets = main.histogram_ms[phase]
            if buckets:
                counts, _ = np.histogram(
                    [v for v, _ in buckets], bins=edges, weights=[c for _, c in buckets]
                )
                axes.stairs(counts, edges, label=phase)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("latency (ms, log scale)")
    axes.set_ylabel("connections")
    axes.set_title("handshake latency by phase")
    axes.legend()
    written.append(_save(figure, out_dir / "latency_histogram.png"))

    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.bar(range(len(main.per_second)), main.per_second)
    axes.set_xlabel("second of the run")
    axes.set_ylabel("attempts completed")
    axes.set_title(f"attempts per second (accepted {main.rate:,.0f}/s overall)")
    written.append(_save(figure, out_dir / "rate_over_time.png"))

    if sweep:
        concurrency = [r.settings["concurrency"] for r in results]
        for name, values, label in (
            ("sweep_throughput.png", [r.rate for r in results], "handshakes/s"),
            ("sweep_p99.png", [r.latency_ms["total"]["p99"] for r in results], "p99 latency (ms)"),
        ):
            figure, axes = plt.subplots(figsize=(8, 4.5))
            axes.plot(concurrency, values, marker="o")
            axes.set_xlabel("concurrency (connections in flight)")
            axes.set_ylabel(label)
            axes.set_title(f"{label} vs concurrency")
            written.append(_save(figure, out_dir / name))
    return written


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# -- fleet bench compare ------------------------------------------------------------------------


def _two(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.2f}"


def _load(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / "report.json"
    try:
        document: dict[str, Any] = json.loads(path.read_text())
        return dict(document["runs"][-1])
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise UsageError(
            f"{path}: not a 'fleet bench handshake --report' report.json ({exc})"
        ) from None


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    metrics = {
        "handshakes/s (accepted)": float(run["rate"]),
        "attempts/s": float(run["attempt_rate"]),
        "accepted": float(run["outcomes"].get("accepted", 0)),
        "refused or failed": float(run["attempts"] - run["outcomes"].get("accepted", 0)),
        "client CPU ms/attempt": float(run["cpu_seconds_per_handshake"]) * 1000,
        "broker CPU ms/attempt": _ms_or_nan(run.get("broker_cpu_seconds_per_handshake")),
        "bytes/handshake": float(run.get("bytes_per_handshake", math.nan)),
    }
    for phase in PHASES:
        for p in ("p50", "p99"):
            metrics[f"{phase} {p} ms"] = float(run["latency_ms"][phase][p])
    return metrics


def _ms_or_nan(seconds: float | None) -> float:
    return math.nan if seconds is None else float(seconds) * 1000


def compare(a: Path, b: Path, console: Console) -> None:
    """Print two runs side by side with the ratio B/A."""
    first, second = _load(a), _load(b)
    table = Table(title="handshake bench comparison", header_style="bold")
    table.add_column("metric", no_wrap=True)
    table.add_column("A", justify="right", no_wrap=True)
    table.add_column("B", justify="right", no_wrap=True)
    table.add_column("B/A", justify="right", no_wrap=True)
    for (name, x), y in zip(_metrics(first).items(), _metrics(second).values(), strict=True):
        ratio = f"{y / x:.2f}" if x and not math.isnan(x) and not math.isnan(y) else "-"
        table.add_row(name, _two(x), _two(y), ratio)
    for label, run in (("A", first), ("B", second)):
        settings = ", ".join(f"{k}={v}" for k, v in run["settings"].items())
        agreed = f"; negotiated {_shares(run.get('groups', {}))}" if run.get("groups") else ""
        console.print(f"{label}: {escape(settings)}{agreed}")
    console.print(table)

"""Live progress and the final summary of a swarm run, rendered with rich."""

from __future__ import annotations

from rich.table import Table

from device.stats import SwarmStats


def progress_table(stats: SwarmStats, *, title: str) -> Table:
    """The live view: refreshed a few times a second while the swarm runs."""
    table = Table(title=title, show_header=False, min_width=60)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("elapsed", f"{stats.elapsed:.1f} s")
    table.add_row("connected now", f"{stats.connected_now:,} / {stats.devices:,}")
    for outcome, count in sorted(stats.attempts.items()):
        table.add_row(f"attempts: {outcome}", f"{count:,}")
    table.add_row("messages sent / acknowledged", f"{stats.sent:,} / {stats.acknowledged:,}")
    table.add_row(
        "connect p50 / p99",
        _latencies({"p50": stats.percentile_ms(50), "p99": stats.percentile_ms(99)}, sep=" / "),
    )
    return table


def _latencies(latency: dict[str, float | None], *, sep: str = ", ") -> str:
    """``p50 1.2 ms, p99 3.4 ms``; "none connected" when there is nothing to measure."""
    if any(value is None for value in latency.values()):
        return "none connected"
    return sep.join(f"{name} {value:.1f} ms" for name, value in latency.items())


def summary_table(stats: SwarmStats) -> Table:
    summary = stats.summary()
    table = Table(title="swarm summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("devices", f"{summary['devices']:,}")
    table.add_row("connection attempts", f"{summary['attempts']:,}")
    for outcome, count in summary["outcomes"].items():
        table.add_row(f"  {outcome}", f"{count:,}")
    for detail, count in list(summary["failure_details"].items())[:10]:
        example = summary["failure_examples"].get(detail)
        table.add_row(f"  {detail}", f"{count:,}" + (f" (e.g. {example})" if example else ""))
    table.add_row("connected at the deadline", f"{summary['connected_at_deadline']:,}")
    messages = summary["messages"]
    table.add_row(
        "QoS messages",
        f"{messages['sent']:,} sent, {messages['acknowledged']:,} acknowledged, {messages['lost']:,} lost",
    )
    table.add_row("connect latency (TCP+TLS+CONNACK)", _latencies(summary["connect_latency_ms"]))
    if summary["negotiated"]:
        agreed = ", ".join(f"{n:,} {what}" for what, n in summary["negotiated"].items())
        table.add_row("key exchange · broker signs with", agreed)
    renewals = summary["renewals"]
    if renewals["done"] or renewals["failed"]:
        failed = ", ".join(f"{n} {reason}" for reason, n in renewals["failed"].items())
        table.add_row(
            "renewals over MQTT", f"{renewals['done']:,} done; failed: {failed or 'none'}"
        )
    if summary["ramp_rate"]:
        table.add_row(
            "ramp", f"{summary['ramp_rate']:,.0f} connects/s over {summary['ramp_seconds']:.1f} s"
        )
    for shard in summary["lost_shards"]:
        table.add_row(
            "[red]lost with their worker[/]",
            f"{shard['devices']:,} devices on {shard['worker']} ({shard['why']})",
        )
    return table

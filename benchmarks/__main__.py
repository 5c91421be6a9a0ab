"""``make bench``: every benchmark, each beside a reference measured in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks import (
    broker,
    cluster,
    control_plane,
    flood,
    handshake,
    post_quantum,
    provisioning,
    swarm,
    traffic,
)
from benchmarks.mqtt_load import percentile

console = Console(width=max(160, Console().width))  # wide tables stay readable in logs


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def bench_provisioning(base: Path, devices: int) -> None:
    console.rule("provisioning")
    figures = provisioning.run(base / "provisioning", count=devices)
    rows = [
        [f.name, f"{f.count:,}", str(f.processes), f"{f.seconds:.2f}", f"{f.rate:,.0f}"]
        for f in figures
    ]
    console.print(
        _table(
            f"provisioning {devices:,} devices (EC P-256)",
            ["what", "count", "processes", "seconds", "per second"],
            rows,
        )
    )
    ours, reference = figures[0], figures[2]
    console.print(
        f"fleet provision reaches {ours.rate / reference.rate:.0%} of the bare-cryptography rate "
        f"on {reference.processes} processes; 10,000 devices in {10_000 / ours.rate:.2f} s "
        "(target: at most 2 s)"
    )


def bench_broker(base: Path, churn_connects: int, held: int) -> None:
    console.rule("broker")
    report = broker.run(base / "broker", churn_connects=churn_connects, held=held)
    rows = [
        [
            f.broker,
            f"{f.connects:,}",
            str(f.failures),
            f"{f.rate:,.0f}",
            f"{f.p50_ms:.1f}",
            f"{f.p99_ms:.1f}",
            f"{f.broker_cpu_ms:.2f}",
        ]
        for f in report.churn
    ]
    console.print(
        _table(
            "connect churn: fresh device certificate per connection, TLS + CONNECT/CONNACK + "
            "DISCONNECT, 50 in flight, same client",
            [
                "broker",
                "connects",
                "failed",
                "per second",
                "p50 ms",
                "p99 ms",
                "broker CPU ms/connect",
            ],
            rows,
        )
    )
    if len(report.churn) == 2:
        ratio = report.churn[0].rate / report.churn[1].rate
        console.print(f"our churn rate is {ratio:.0%} of Mosquitto's (target: at least 60%)")
    latencies = report.revocation_ms
    console.print(
        f"revocation latency (fleet revoke -> live session closed) over {len(latencies)} "
        f"revocations: p50 {percentile(latencies, 0.5):.0f} ms, p99 {percentile(latencies, 0.99):.0f} ms, "
        f"max {max(latencies):.0f} ms (target p99 <= 250 ms)"
    )
    rows = [
        [
            f.broker,
            f"{f.held:,}",
            f"{f.ramp_rate:,.0f}",
            f"{f.rss_per_connection_kb:.0f}",
            f"{f.round_trip_p99_ms:.0f}",
            f"{f.max_stall_ms:.0f}",
        ]
        for f in report.held
    ]
    console.print(
        _table(
            "held connections (ramp with 100 in flight, then all disconnect at once)",
            ["broker", "held", "ramp /s", "RSS KB/conn", "pub/sub p99 ms (ramp)", "max stall ms"],
            rows,
        )
    )
    console.print(
        "targets: <= 50 KB RSS per held connection; pub/sub p99 during the ramp <= 2x "
        "Mosquitto's; no stall over 500 ms when everyone disconnects. The load client shares "
        "the machine's cores."
    )
    if len(report.held) == 2:
        ours, theirs = report.held
        console.print(
            f"ramp pub/sub p99: ours {ours.round_trip_p99_ms:.0f} ms = "
            f"{ours.round_trip_p99_ms / theirs.round_trip_p99_ms:.2f}x Mosquitto's; RSS per "
            f"connection {ours.rss_per_connection_kb:.0f} KB vs {theirs.rss_per_connection_kb:.0f} KB"
        )


def bench_swarm(base: Path, devices: int, duration: float) -> None:
    console.rule("swarm")
    report = swarm.run(base / "swarm", devices=devices, duration=duration)
    held = report.held
    console.print(
        _table(
            f"{held.devices:,} simulated devices held on the embedded broker (separate processes), "
            f"ramp 300/s, QoS 1 every 10 s, for {duration:g} s",
            ["figure", "value", "target"],
            [
                ["connected at the deadline", f"{held.connected:,}", f"{held.devices:,}"],
                ["achieved ramp", f"{held.ramp_rate:,.0f} connects/s", ">= 300/s"],
                [
                    "swarm RSS per device (peak, above idle shards)",
                    f"{held.swarm_kb_per_device:.0f} KB",
                    "<= 80 KB",
                ],
                [
                    "broker RSS per device (peak, above idle)",
                    f"{held.broker_kb_per_device:.0f} KB",
                    "<= 100 KB",
                ],
                ["pub/sub round trip p99 (whole run)", f"{held.round_trip_p99_ms:.0f} ms", "-"],
                ["QoS 1 messages sent / lost", f"{held.sent:,} / {held.lost:,}", "lost = 0"],
            ],
        )
    )
    if report.mosquitto_ramp is not None:
        name, rate, connected = report.mosquitto_ramp
        console.print(
            f"swarm ramp against {name}: {connected:,} of {held.devices:,} devices connected at "
            f"{rate:,.0f} connects/s (100 in flight per shard, one shard per core; target >= 300/s)"
        )
    churn = report.churn
    if churn is None:
        console.print("Mosquitto is not installed: the churn comparison is skipped")
        return
    reference = f"{churn.openssl:,.0f}/s" if churn.openssl else "unavailable"
    ratio = f" ({churn.ours / churn.openssl:.0%} of it; target >= 90%)" if churn.openssl else ""
    console.print(
        f"connect churn against {churn.broker}: our device client {churn.ours:,.0f}/s "
        f"(TLS + CONNECT/CONNACK + DISCONNECT) vs openssl s_time -new {reference} (TLS only){ratio}"
    )
    if churn.openssl_cpu_ms:
        console.print(
            f"client CPU per connect: our device {churn.ours_cpu_ms:.2f} ms vs openssl s_time "
            f"-new {churn.openssl_cpu_ms:.2f} ms per handshake = "
            f"{churn.ours_cpu_ms / churn.openssl_cpu_ms:.2f}x (target <= 1.3x)"
        )


def bench_post_quantum(base: Path, connections: int, rounds: int) -> None:
    console.rule("post-quantum")
    report = post_quantum.run(base / "post-quantum", connections=connections, rounds=rounds)
    classical = report.rows[0]
    rows = [
        [
            row.chain.name,
            row.negotiated,
            f"{row.rate:,.0f}",
            f"{row.rate / classical.rate:.2f}",
            f"{row.p99_ms:.1f}",
            f"{row.client_cpu_ms:.2f}",
            f"{row.broker_cpu:.2f}",
            f"{row.bytes:,.0f}",
            f"{row.bytes / classical.bytes:.2f}",
        ]
        for row in report.rows
    ]
    console.print(
        _table(
            f"post-quantum TLS: fleet bench handshake against our broker, {connections:,} "
            f"connections a run, 100 in flight, TLS 1.3, mean of {rounds} alternating round(s); "
            "bytes: "
            "TLS records both ways until the broker's tickets",
            [
                "chain",
                "group · broker signs with",
                "handshakes/s",
                "x classical",
                "p99 ms",
                "client CPU ms",
                "broker CPU ms",
                "bytes/handshake",
                "x classical",
            ],
            rows,
        )
    )
    if report.openssl_classical:
        console.print(
            f"reference: openssl s_time -new (OpenSSL 3.0, classical chain, same broker) "
            f"{report.openssl_classical:,.0f} handshakes/s; our classical client reaches "
            f"{classical.rate / report.openssl_classical:.0%} of it (with MQTT CONNECT/CONNACK)"
        )
    console.print(f"plot: {base / 'post-quantum' / 'post_quantum.png'}")


def bench_handshake(base: Path, connections: int) -> None:
    console.rule("handshake")
    rows = handshake.run(base / "handshake", connections=connections)
    table_rows = []
    for row in rows:
        r = row.result
        reference = f"{row.openssl:,.0f}" if row.openssl else "-"
        ratio = f"{r.attempt_rate / row.openssl:.0%}" if row.openssl else "-"
        table_rows.append(
            [
                row.broker,
                row.mode,
                f"{r.attempts:,}",
                f"{r.attempts - r.accepted:,}",
                f"{r.attempt_rate:,.0f}",
                f"{r.latency_ms['total']['p50']:.1f}",
                f"{r.latency_ms['total']['p99']:.1f}",
                f"{r.cpu_seconds_per_handshake * 1000:.2f}",
                str(r.resumed),
                reference,
                ratio,
            ]
        )
    console.print(
        _table(
            "fleet bench handshake: a certificate per connection, TLS 1.2 + CONNECT/CONNACK + "
            "DISCONNECT, 100 in flight, one client process per core (sharing the cores with "
            "the broker); resumed: each identity's second connection resumes its TLS session",
            [
                "broker",
                "mode",
                "attempts",
                "refused",
                "per second",
                "p50 ms",
                "p99 ms",
                "client CPU ms",
                "resumed",
                "openssl s_time/s",
                "ours/s_time",
            ],
            table_rows,
        )
    )
    by_key = {(row.broker.split()[0], row.mode): row.result for row in rows}
    ours, theirs = by_key.get(("mtls-fleet", "full")), by_key.get(("mosquitto", "full"))
    if ours and theirs:
        console.print(
            f"our broker's churn is {ours.rate / theirs.rate:.0%} of Mosquitto's (target >= 70%)"
        )
    for name in ("mtls-fleet", "mosquitto"):
        resumed = by_key.get((name, "resumed"))
        if resumed and resumed.full:
            baseline = resumed.full["rate"]  # the full handshakes of the same identities, same run
            console.print(
                f"{name}: resumed sessions {resumed.rate:,.0f}/s vs full handshakes "
                f"{baseline:,.0f}/s = {resumed.rate / baseline:.2f}x (target >= 2x)"
            )
    for row in rows:
        if row.openssl and row.mode == "full":
            console.print(
                f"against {row.broker}: our client {row.result.attempt_rate:,.0f}/s vs openssl "
                f"s_time -new {row.openssl:,.0f}/s = {row.result.attempt_rate / row.openssl:.0%} "
                "(target >= 90% against Mosquitto)"
            )


def bench_control_plane(base: Path) -> None:
    console.rule("control plane")
    figures = control_plane.run(base / "control-plane")
    console.print(
        _table(
            f"OCSP answers for {figures.requests:,} requests (good, signed, EC P-256)",
            ["how", "per second"],
            [
                [
                    "bare: OcspResponder.answer() in one process (registry lookup + sign)",
                    f"{figures.bare_per_second:,.0f}",
                ],
                [
                    f"fleet serve over HTTP, {figures.http_clients} client threads, a connection each",
                    f"{figures.http_per_second:,.0f}",
                ],
            ],
        )
    )


def bench_enrollment(base: Path, devices: int = 500) -> None:
    console.rule("enrollment")
    report = control_plane.run_enrollment(base / "enrollment", devices=devices)
    rows = [
        [
            f"enroll through a claim over MQTT via {f.through} (fleet serve --broker)",
            f"{f.enrolled}/{f.devices}",
            f"{f.seconds:.2f}",
            f"{f.per_second:,.0f}",
            f"{f.p50_ms:.0f} / {f.p99_ms:.0f}",
        ]
        for f in report.runs
    ]
    rows.append(
        [
            "reference: provision_from_csr in one process (the control plane's share, no MQTT)",
            str(devices), "", f"{report.signing_per_second:,.0f}", "",
        ]
    )  # fmt: skip
    rows.append(
        [
            "reference: fleet provision (keys made by the fleet, bulk)",
            str(devices), "", f"{report.provisioning_per_second:,.0f}", "",
        ]
    )  # fmt: skip
    console.print(
        _table(
            f"enrollment of {devices} devices (CSR over MQTT to signed certificate in hand)",
            ["how", "devices", "seconds", "per second", "p50 / p99 ms (all start at once)"],
            rows,
        )
    )


def bench_flood(base: Path, flooders: int = 20, seconds: float = 10.0) -> None:
    console.rule("flood")
    figures = flood.run(base / "flood", flooders=flooders, seconds=seconds)
    mib = 2**20
    rows = [
        [
            f.broker,
            f"{f.sent_bytes / mib:,.0f}",
            f"{f.rss_before / mib:.0f}",
            f"{f.rss_peak / mib:.0f}",
            f"{f.growth_mb:,.0f}",
            f"{f.rss_after / mib:.0f}",
            f"{f.paced_acked}/{f.paced_sent}",
            f"{f.paced_delivered}/{f.paced_sent}",
        ]
        for f in figures
    ]
    console.print(
        _table(
            f"QoS 0 flood: {flooders} devices writing 1 KiB PUBLISHes as fast as read for "
            f"{seconds:g} s (one also subscribed to its own topic, never reading), beside a "
            "device publishing QoS 1 at a steady pace to a topic it subscribes to",
            [
                "broker",
                "flood MiB read",
                "RSS before MiB",
                "RSS peak MiB",
                "growth MiB",
                "RSS after MiB",
                "paced acked",
                "paced delivered",
            ],
            rows,
        )
    )


def _ratio(ours: float, reference: float) -> str:
    return f"{ours / reference:.0%}" if reference else "-"


def _steps_table(title: str, figures: list[traffic.TrafficFigure]) -> Table:
    columns = ["offered deliveries/s"]
    for figure in figures:
        columns += [f"{figure.broker}: delivered", "p50 ms", "p99 ms"]
    rows = []
    for index, step in enumerate(figures[0].steps):
        row = [f"{step.offered_deliveries:,.0f}"]
        for figure in figures:
            theirs = figure.steps[index]
            row += [f"{theirs.delivered:,}/{theirs.sent:,}", f"{theirs.p50_ms:.1f}",
                    f"{theirs.p99_ms:.1f}"]  # fmt: skip
        rows.append(row)
    return _table(title, columns, rows)


def _best_rate(figure: traffic.TrafficFigure) -> float:
    best = figure.best_in_full()
    return best.offered_deliveries if best is not None else 0.0


def bench_traffic(base: Path) -> None:
    console.rule("traffic")
    report = traffic.run(base / "traffic")
    console.print(
        _steps_table(
            "fan-in: 20 publishers (own certificates, load client in one process per core), one "
            "silver subscriber of devices/+/telemetry, 64-byte QoS 1, 3 s per step",
            report.fan_in,
        )
    )
    console.print(
        _steps_table(
            "fan-out: one gold publisher to fleet/broadcast/bench, 1,000 subscribers of "
            "fleet/broadcast/# (QoS 1, one process per core), 64-byte QoS 1, 3 s per step",
            report.fan_out,
        )
    )
    rows = []
    for kind, paced, floods in (
        ("fan-in", report.fan_in, report.fan_in_flood),
        ("fan-out", report.fan_out, report.fan_out_flood),
    ):
        for stepped, flooding in zip(paced, floods, strict=True):
            flooded = flooding.steps[0]
            rows.append(
                [kind, stepped.broker, f"{_best_rate(stepped):,.0f}",
                 f"{flooded.delivered_rate:,.0f}", f"{flooded.p99_ms:,.0f}",
                 f"{stepped.steps[0].broker_cpu_us:.1f}", f"{stepped.steps[0].client_cpu_s:.1f}"]
            )  # fmt: skip
    console.print(
        _table(
            f"traffic: highest rate delivered in full with p99 <= {traffic.P99_LIMIT_MS:.0f} ms, "
            "and an unpaced flood (each publisher keeps 20 QoS 1 unacknowledged) for 5 s",
            ["traffic", "broker", "in full, deliveries/s", "flood deliveries/s", "flood p99 ms",
             "broker CPU us/delivery", "load client CPU s"],
            rows,
        )
    )  # fmt: skip
    for kind, paced, floods in (
        ("fan-in", report.fan_in, report.fan_in_flood),
        ("fan-out", report.fan_out, report.fan_out_flood),
    ):
        if len(paced) == 2:
            in_full = _ratio(_best_rate(paced[0]), _best_rate(paced[1]))
            flood_ratio = _ratio(
                floods[0].steps[0].delivered_rate, floods[1].steps[0].delivered_rate
            )
            console.print(
                f"{kind}: ours is {in_full} of Mosquitto's rate in full and {flood_ratio} of its "
                "flood deliveries (target >= 25%, moonshot 50%)"
            )


def bench_cluster(base: Path, devices: int, duration: float) -> None:
    console.rule("swarm on Dask")
    report = cluster.run(base / "cluster", devices=devices, duration=duration)
    rows = [
        [f.runner, f"{f.connected:,} / {f.devices:,}", f"{f.connect_rate:,.0f}/s",
         f"{f.message_rate:,.0f}/s", f"{f.lost:,}"]
        for f in report.runs
    ]  # fmt: skip
    console.print(
        _table(
            f"{devices:,} devices on the embedded broker, QoS 1 every second, {duration:g} s a "
            f"run (the same devices and broker; the runners alternate, {cluster.ROUNDS} rounds)",
            ["runner", "connected at the end", "connect rate", "message rate", "lost"],
            rows,
        )
    )
    ratios = {
        figure: report.mean(cluster.DASK, figure) / report.mean(cluster.PROCESSES, figure)
        for figure in ("connect_rate", "message_rate")
    }
    console.print(
        f"Dask / processes (means): connect rate {ratios['connect_rate']:.0%}, message rate "
        f"{ratios['message_rate']:.0%} (target >= 90% each)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("bench-data"), help="scratch directory")
    parser.add_argument(
        "--only",
        choices=[
            "provisioning",
            "broker",
            "flood",
            "traffic",
            "swarm",
            "handshake",
            "control-plane",
            "enrollment",
            "cluster",
            "post-quantum",
        ],
        help="run one benchmark",
    )
    parser.add_argument("--devices", type=int, default=10_000, help="devices to provision")
    parser.add_argument("--churn", type=int, default=2_000, help="connections in the churn run")
    parser.add_argument("--held", type=int, default=10_000, help="connections to hold at once")
    parser.add_argument(
        "--handshakes", type=int, default=5_000, help="connections per handshake bench run"
    )
    parser.add_argument(
        "--swarm-seconds", type=float, default=120.0, help="duration of the swarm run"
    )
    parser.add_argument(
        "--pq-handshakes", type=int, default=2_000, help="connections per post-quantum run"
    )
    parser.add_argument(
        "--pq-rounds", type=int, default=2, help="alternating rounds of the post-quantum runs"
    )
    parser.add_argument(
        "--cluster-devices", type=int, default=4_000, help="devices in the Dask comparison"
    )
    parser.add_argument(
        "--cluster-seconds", type=float, default=30.0, help="duration of each Dask comparison run"
    )
    args = parser.parse_args()
    if args.only in (None, "provisioning"):
        bench_provisioning(args.dir, args.devices)
    if args.only in (None, "broker"):
        bench_broker(args.dir, args.churn, args.held)
    if args.only in (None, "control-plane"):
        bench_control_plane(args.dir)
    if args.only in (None, "enrollment"):
        bench_enrollment(args.dir)
    if args.only in (None, "handshake"):
        bench_handshake(args.dir, args.handshakes)
    if args.only in (None, "post-quantum"):
        bench_post_quantum(args.dir, args.pq_handshakes, args.pq_rounds)
    if args.only in (None, "flood"):
        bench_flood(args.dir)
    if args.only in (None, "traffic"):
        bench_traffic(args.dir)
    if args.only in (None, "swarm"):
        bench_swarm(args.dir, args.held, args.swarm_seconds)
    if args.only in (None, "cluster"):
        bench_cluster(args.dir, args.cluster_devices, args.cluster_seconds)


if __name__ == "__main__":
    main()

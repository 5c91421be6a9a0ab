"""``fleet swarm``: input validation, the embedded broker when no target is given, the views."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from broker import launched_broker
from device.report import progress_table, summary_table
from device.stats import SwarmStats
from device.swarm import SwarmConfig, run_swarm
from fleet.controlplane.swarm_feed import SwarmFeed, SwarmProgress
from fleet.kernel.addresses import parse_source_ips
from fleet.kernel.durations import parse_positive_duration
from fleet.kernel.errors import UsageError
from fleet.kernel.tls import parse_groups, parse_pin
from fleet.store.workspace import Workspace

_TARGET = re.compile(r"^mqtts://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)/?$")


@dataclass(frozen=True, slots=True)
class SwarmRequest:
    config: SwarmConfig
    processes: int | None
    embedded_broker: bool

    @classmethod
    def parse(
        cls,
        *,
        workspace: Workspace,
        devices: int,
        ramp: str,
        publish_every: str,
        qos: int,
        duration: str,
        target: str | None,
        server_name: str,
        processes: str,
        in_flight: int,
        payload_size: int,
        mqtt_version: str,
        source_ips: str | None,
        renew_at: str | None = None,
        pins: Sequence[str] = (),
        groups: str | None = None,
    ) -> SwarmRequest:
        if devices < 1:
            raise UsageError(f"invalid --devices {devices}: give a positive number")
        available = [
            r.device_id
            for r in workspace.registry.devices(status="active")
            if r.key_source == "generated"
        ]
        if len(available) < devices:
            raise UsageError(
                f"only {len(available)} active devices with keys in {workspace.paths.root}; "
                f"run 'fleet provision --count {devices - len(available)}' first"
            )
        if qos not in (0, 1):
            raise UsageError(f"invalid --qos {qos}: use 0 or 1")
        if mqtt_version not in ("3.1.1", "5"):
            raise UsageError(f"invalid --mqtt {mqtt_version!r}: use 3.1.1 or 5")
        if mqtt_version == "5" and target is None:
            raise UsageError(
                "--mqtt 5 needs --target: the embedded broker speaks MQTT 3.1.1 only (it answers "
                "an MQTT 5 CONNECT with CONNACK 1, unacceptable protocol version); point the "
                "swarm at an MQTT 5 broker with --target mqtts://HOST:PORT"
            )
        if in_flight < 1:
            raise UsageError("--in-flight must be at least 1")
        host, port = ("127.0.0.1", 0) if target is None else parse_target(target)
        config = SwarmConfig(
            workspace=workspace.paths.root,
            device_ids=tuple(available[:devices]),
            host=host,
            port=port,
            server_name=server_name,
            ramp_per_second=_parse_rate(ramp),
            max_in_flight=in_flight,
            publish_every=parse_positive_duration(publish_every).total_seconds(),
            qos=qos,
            payload_size=max(0, payload_size),
            duration=parse_positive_duration(duration).total_seconds(),
            mqtt_version=5 if mqtt_version == "5" else 4,
            source_ips=parse_source_ips(source_ips) if source_ips else (),
            renew_at=_parse_fraction(renew_at) if renew_at else None,
            pins=tuple(_parse_pin(pin) for pin in pins),
            groups=parse_groups(groups) if groups else (),
        )
        return cls(
            config=config, processes=parse_processes(processes), embedded_broker=target is None
        )


def _parse_pin(text: str) -> str:
    try:
        return parse_pin(text)
    except ValueError as exc:
        raise UsageError(f"--pin: {exc}") from None


def _parse_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 1:
        raise UsageError(f"invalid --renew-at {text!r}: a fraction of the lifetime, e.g. 0.66")
    return value


def parse_target(text: str) -> tuple[str, int]:
    match = _TARGET.fullmatch(text.strip())
    if match is None:
        raise UsageError(
            f"invalid --target {text!r}: use mqtts://HOST:PORT, e.g. mqtts://127.0.0.1:8883"
        )
    return match["host"].strip("[]"), int(match["port"])


def _parse_rate(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/s)?\s*", text)
    if match is None or float(match[1]) <= 0:
        raise UsageError(f"invalid --ramp {text!r}: use connections per second, e.g. 300/s")
    return float(match[1])


def parse_processes(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"invalid --processes {text!r}: use auto or a positive number")
    return int(text)


def run_swarm_command(
    request: SwarmRequest,
    *,
    console: Console,
    quiet: bool,
    json_out: Path | None,
    web_port: int | None = None,
    cluster: Any = None,
) -> SwarmStats:
    """Run the swarm (on ``cluster``'s Dask workers when given) and print its summary."""
    config = request.config
    run = functools.partial(
        _run, console=console, quiet=quiet, json_out=json_out, web_port=web_port, cluster=cluster
    )
    if request.embedded_broker:
        with launched_broker(config.workspace) as broker:
            port = broker.port
            console.print(f"embedded broker on {broker.target}")
            request = replace(request, config=replace(config, port=port))
            if config.renew_at is None:
                return run(request)
            with _answering_renewals(config.workspace, port):
                console.print("control plane answering renewals on the embedded broker")
                return run(request)
    return run(request)


@contextmanager
def _answering_renewals(workspace: Path, port: int) -> Iterator[None]:
    """The control plane's MQTT service on the embedded broker, for the run (against a target,
    run 'fleet serve --broker TARGET' instead)."""
    from fleet.controlplane.mqtt_service import CertificateService
    from fleet.store.certificate_requests import CertificateRequests

    opened = Workspace.open(workspace)
    service = CertificateService(opened, CertificateRequests(opened), host="127.0.0.1", port=port)
    service.start()
    try:
        yield
    finally:
        service.stop()


@contextmanager
def _web_view(port: int | None, title: str, console: Console) -> Iterator[SwarmFeed | None]:
    """The run's web page on ``port`` while the run lasts (None: no page)."""
    if port is None:
        yield None
        return
    from fleet.controlplane.dashboard import Dashboard

    feed = SwarmFeed(title)
    dashboard = Dashboard(port=port, swarm=feed)
    try:
        dashboard.start()
    except OSError as exc:
        raise UsageError(f"cannot serve --web on 127.0.0.1:{port}: {exc.strerror}") from None
    console.print(f"web view on {dashboard.url}/swarm")
    try:
        yield feed
    finally:
        dashboard.stop(grace=1.5)


def swarm_progress(stats: SwarmStats, *, finished: bool = False) -> SwarmProgress:
    """What the web page shows of a run's statistics."""
    return SwarmProgress(
        elapsed=stats.elapsed,
        devices=stats.devices,
        connected=stats.connected_now,
        attempts=dict(stats.attempts),
        details=dict(stats.details.most_common(20)),
        sent=stats.sent,
        acknowledged=stats.acknowledged,
        latency_ms={p: stats.percentile_ms(n) for p, n in (("p50", 50), ("p90", 90), ("p99", 99))},
        finished=finished,
    )


def _run(
    request: SwarmRequest,
    *,
    console: Console,
    quiet: bool,
    json_out: Path | None,
    web_port: int | None,
    cluster: Any,
) -> SwarmStats:
    config = request.config
    title = f"{len(config.device_ids):,} devices -> mqtts://{config.host}:{config.port}"
    if cluster is not None:
        from device.cluster import cluster_workers

        where = f"{len(cluster_workers(cluster))} Dask worker(s) of {cluster.scheduler.address}"
    else:
        where = f"{request.processes or os.cpu_count() or 1} process(es)"
    line = f"swarm: {title}, ramp {config.ramp_per_second:g}/s, {where}, {config.duration:g} s"
    live_view = not quiet and console.is_terminal
    with ExitStack() as stack:
        feed = stack.enter_context(_web_view(web_port, title, console))
        live: Live | None = None
        if live_view:
            console.print(line)
            live = stack.enter_context(Live(console=console, refresh_per_second=4, transient=True))

        def progress(stats: SwarmStats) -> None:
            if live is not None:
                live.update(progress_table(stats, title=title))
            if feed is not None:
                feed.push(swarm_progress(stats))

        on_start = None if live_view else lambda: console.print(line)
        on_progress = progress if live is not None or feed is not None else None
        if cluster is not None:
            from device.cluster import run_swarm_on_cluster

            stats = run_swarm_on_cluster(
                config, cluster, on_progress=on_progress, on_start=on_start
            ).stats
        else:
            stats = run_swarm(
                config, processes=request.processes, on_start=on_start, on_progress=on_progress
            )
        if feed is not None:
            feed.push(swarm_progress(stats, finished=True))
    if stats.interrupted:
        console.print("[yellow]interrupted: the summary covers what happened until Ctrl-C[/]")
    console.print(summary_table(stats))
    if json_out is not None:
        json_out.write_text(json.dumps(stats.summary(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    return stats

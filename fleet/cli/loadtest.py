"""``fleet swarm`` and ``fleet bench handshake|compare``: load on a broker. The heavy glue
(:mod:`.swarm`, :mod:`.bench`) is imported when a command runs, so ``fleet --help`` stays quick."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.support import (
    DeviceGroupsOption,
    DirOption,
    friendly_errors,
    out,
)
from fleet.store.workspace import DEFAULT_DIR, Workspace

bench_app = typer.Typer(help="Load-test mutual-TLS handshakes of a broker.", no_args_is_help=True)


@friendly_errors
def swarm(
    directory: DirOption = DEFAULT_DIR,
    devices: Annotated[int, typer.Option(help="How many provisioned devices to run.")] = 100,
    ramp: Annotated[str, typer.Option(help="Connection rate, e.g. 300/s.")] = "300/s",
    publish_every: Annotated[str, typer.Option(help="Telemetry interval per device.")] = "10s",
    qos: Annotated[int, typer.Option(help="QoS of telemetry (0 or 1).")] = 1,
    duration: Annotated[str, typer.Option(help="How long the run lasts.")] = "1m",
    target: Annotated[
        str | None,
        typer.Option(
            help="mqtts://HOST:PORT of any mTLS broker (default: start the embedded one)."
        ),
    ] = None,
    server_name: Annotated[
        str, typer.Option(help="Host name the broker certificate must carry.")
    ] = "localhost",
    processes: Annotated[
        str, typer.Option(help="Shard processes: auto (one per core) or N.")
    ] = "auto",
    in_flight: Annotated[int, typer.Option(help="Most handshakes in flight per process.")] = 100,
    payload_size: Annotated[int, typer.Option(help="Telemetry payload bytes.")] = 64,
    mqtt_version: Annotated[str, typer.Option("--mqtt", help="3.1.1 or 5.")] = "3.1.1",
    source_ips: Annotated[
        str | None,
        typer.Option(help="Spread connections over source addresses, e.g. 127.0.0.2-127.0.0.9."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the summary as JSON.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No live view (for CI logs).")] = False,
    renew_at: Annotated[
        str | None,
        typer.Option(
            help="Renew over MQTT at this fraction of each certificate's lifetime (e.g. 0.66); "
            "the embedded broker gets a control plane, a --target needs 'fleet serve --broker'."
        ),
    ] = None,
    pin: Annotated[
        list[str] | None,
        typer.Option(
            help="Pin the broker's key: sha256/BASE64 of its SubjectPublicKeyInfo (repeatable); "
            "a valid chain for another key is then refused (broker_untrusted: pin_mismatch)."
        ),
    ] = None,
    web: Annotated[
        int | None,
        typer.Option(metavar="PORT", help="Show the run live in the browser on this port."),
    ] = None,
    groups: DeviceGroupsOption = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Run the shards on this Dask cluster (tls://HOST:8786), one per worker, "
            "instead of local processes."
        ),
    ] = None,
    cluster_certs: Annotated[
        Path,
        typer.Option(help="The client certificate for --scheduler (from 'fleet cluster certs')."),
    ] = Path("cluster-certs"),
) -> None:
    """Connect provisioned devices, each with its own certificate, and keep them publishing."""
    from fleet.cli.swarm import SwarmRequest, run_swarm_command

    request = SwarmRequest.parse(
        workspace=Workspace.open(directory),
        devices=devices,
        ramp=ramp,
        publish_every=publish_every,
        qos=qos,
        duration=duration,
        target=target,
        server_name=server_name,
        processes=processes,
        in_flight=in_flight,
        payload_size=payload_size,
        mqtt_version=mqtt_version,
        source_ips=source_ips,
        renew_at=renew_at,
        pins=pin or (),
        groups=groups,
    )
    if scheduler is not None:
        from fleet.cli.cluster import cluster_client

        with cluster_client(scheduler, cluster_certs) as client:
            stats = run_swarm_command(
                request, console=out, quiet=quiet, json_out=json_out, web_port=web, cluster=client
            )
    else:
        stats = run_swarm_command(
            request, console=out, quiet=quiet, json_out=json_out, web_port=web
        )
    if stats.interrupted:
        raise typer.Exit(130)


@bench_app.command("handshake")
@friendly_errors
def bench_handshake(
    directory: DirOption = DEFAULT_DIR,
    target: Annotated[
        str | None,
        typer.Option(help="mqtts://HOST:PORT of a broker trusting DIR's CA (default: embedded)."),
    ] = None,
    server_name: Annotated[
        str, typer.Option(help="Host name the broker certificate must carry.")
    ] = "localhost",
    connections: Annotated[
        int, typer.Option(help="Connections, each with its own device certificate.")
    ] = 5000,
    concurrency: Annotated[int, typer.Option(help="Connections in flight (all processes).")] = 100,
    tls: Annotated[str | None, typer.Option(help="Pin the TLS version: 1.2 or 1.3.")] = None,
    key_type: Annotated[
        str | None,
        typer.Option(
            help="Device key type: ec-p256, ec-p384, rsa2048, rsa3072, ed25519, ml-dsa-44, "
            "ml-dsa-65, ml-dsa-87 [default: the workspace's]."
        ),
    ] = None,
    groups: DeviceGroupsOption = None,
    resume: Annotated[
        bool, typer.Option(help="Also measure TLS session resumption against full handshakes.")
    ] = False,
    reject_mix: Annotated[
        str, typer.Option(help="Share of identities the broker must refuse, e.g. 10%.")
    ] = "0%",
    processes: Annotated[
        str, typer.Option(help="Client processes: auto (one per core) or N.")
    ] = "auto",
    sweep: Annotated[
        str | None, typer.Option(help="Run a series, e.g. concurrency=10,50,100,200.")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="'openssl': also run openssl s_time -new against the same target."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Write report.json and PNG plots to this directory.")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Run the client shards on this Dask cluster (tls://HOST:8786)."),
    ] = None,
    cluster_certs: Annotated[
        Path,
        typer.Option(help="The client certificate for --scheduler (from 'fleet cluster certs')."),
    ] = Path("cluster-certs"),
) -> None:
    """Connection churn (TLS + CONNECT/CONNACK + DISCONNECT) with a certificate per connection."""
    from fleet.cli.bench import BenchRequest, run_bench_command

    request = BenchRequest.parse(
        connections=connections,
        concurrency=concurrency,
        target=target,
        server_name=server_name,
        tls=tls,
        key_type=key_type,
        groups=groups,
        resume=resume,
        reject_mix=reject_mix,
        processes=processes,
        sweep=sweep,
        reference=reference,
    )
    if scheduler is None:
        run_bench_command(Workspace.open(directory), request, console=out, report=report)
        return
    from fleet.cli.cluster import cluster_client

    with cluster_client(scheduler, cluster_certs) as client:
        run_bench_command(
            Workspace.open(directory), request, console=out, report=report, cluster=client
        )


@bench_app.command("compare")
@friendly_errors
def bench_compare(
    first: Annotated[Path, typer.Argument(metavar="A", help="report.json (or its directory).")],
    second: Annotated[Path, typer.Argument(metavar="B", help="report.json (or its directory).")],
) -> None:
    """Print two handshake bench runs side by side with ratios (B/A)."""
    from fleet.cli.bench_report import compare

    compare(first, second, out)

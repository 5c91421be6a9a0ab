"""``fleet bench handshake``: input validation, identities, the embedded broker, the runs."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from broker import launched_broker
from device.handshake_bench import (
    BenchResult,
    BenchSettings,
    openssl_s_time_rate,
    process_cpu_seconds,
    run_handshake_bench,
)
from fleet.cli.bench_identities import bench_identities
from fleet.cli.bench_report import print_result, print_sweep, write_report
from fleet.cli.swarm import parse_processes, parse_target
from fleet.kernel.errors import UsageError
from fleet.kernel.keys import KeyType
from fleet.kernel.tls import parse_groups
from fleet.store.workspace import Workspace


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """A validated ``fleet bench handshake`` command line."""

    connections: int
    concurrency: tuple[int, ...]  # one value, or the sweep's series
    target: tuple[str, int] | None
    server_name: str
    tls_version: str | None
    key_type: KeyType | None
    groups: tuple[str, ...]
    resume: bool
    reject_mix: float
    processes: int | None
    reference: str | None

    @property
    def sweep(self) -> bool:
        return len(self.concurrency) > 1

    @classmethod
    def parse(
        cls,
        *,
        connections: int,
        concurrency: int,
        target: str | None,
        server_name: str,
        tls: str | None,
        key_type: str | None,
        groups: str | None,
        resume: bool,
        reject_mix: str,
        processes: str,
        sweep: str | None,
        reference: str | None,
    ) -> BenchRequest:
        if connections < 1:
            raise UsageError(f"invalid --connections {connections}: give a positive number")
        if concurrency < 1:
            raise UsageError(f"invalid --concurrency {concurrency}: give a positive number")
        if tls not in (None, "1.2", "1.3"):
            raise UsageError(f"invalid --tls {tls!r}: use 1.2 or 1.3")
        if reference not in (None, "openssl"):
            raise UsageError(f"invalid --reference {reference!r}: the reference is 'openssl'")
        return cls(
            connections=connections,
            concurrency=_parse_sweep(sweep) if sweep else (concurrency,),
            target=parse_target(target) if target else None,
            server_name=server_name,
            tls_version=tls,
            key_type=KeyType.parse(key_type) if key_type else None,
            groups=parse_groups(groups) if groups else (),
            resume=resume,
            reject_mix=_parse_fraction(reject_mix),
            processes=parse_processes(processes),
            reference=reference,
        )


def _parse_fraction(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    value = float(match[1]) / (100 if match[2] else 1) if match else -1.0
    if not 0 <= value < 1:
        raise UsageError(f"invalid --reject-mix {text!r}: use a share below 100%, e.g. 10%")
    return value


def _parse_sweep(text: str) -> tuple[int, ...]:
    name, _, values = text.partition("=")
    try:
        series = tuple(int(v) for v in values.split(","))
    except ValueError:
        series = ()
    if name.strip() != "concurrency" or len(series) < 2 or min(series) < 1:
        raise UsageError(
            f"invalid --sweep {text!r}: use concurrency=V1,V2,... with two or more positive values"
        )
    return tuple(sorted(set(series)))


@contextlib.contextmanager
def _broker(workspace: Workspace, request: BenchRequest) -> Iterator[tuple[str, int, int | None]]:
    """(host, port, the embedded broker's pid: None for a target)."""
    if request.target is not None:
        yield (*request.target, None)
        return
    with launched_broker(workspace.paths.root) as broker:
        yield ("127.0.0.1", broker.port, broker.process.pid)


def run_bench_command(
    workspace: Workspace,
    request: BenchRequest,
    *,
    console: Console,
    report: Path | None,
    cluster: Any = None,
) -> list[BenchResult]:
    """Run the bench (on ``cluster``'s Dask workers when given, else in processes)."""
    results = []
    reference = None
    with (
        bench_identities(
            workspace,
            request.connections,
            key_type=request.key_type,
            reject_mix=request.reject_mix,
        ) as identities,
        _broker(workspace, request) as (host, port, broker_pid),
    ):
        where = "embedded broker" if request.target is None else "target"
        console.print(
            f"{len(identities):,} connections, each with its own certificate, against the {where} "
            f"mqtts://{host}:{port}"
        )
        settings = BenchSettings(
            host=host,
            port=port,
            trust_anchor=workspace.paths.root_cert,
            server_name=request.server_name,
            tls_version=request.tls_version,
            resume=request.resume,
            groups=request.groups,
            key_type=(request.key_type or workspace.config.key_type).value,
        )
        for concurrency in request.concurrency:
            broker_cpu = process_cpu_seconds(broker_pid) if broker_pid else None
            if cluster is not None:
                from device.cluster import run_handshake_bench_on_cluster

                result = run_handshake_bench_on_cluster(
                    replace(settings, concurrency=concurrency), identities, cluster
                )
            else:
                result = run_handshake_bench(
                    replace(settings, concurrency=concurrency),
                    identities,
                    processes=request.processes,
                )
            if broker_pid is not None and broker_cpu is not None:
                used = process_cpu_seconds(broker_pid) - broker_cpu
                result.broker_cpu_seconds_per_handshake = used / max(1, result.attempts)
            results.append(result)
            if request.sweep:
                console.print(
                    f"  concurrency {concurrency}: {result.rate:,.0f} handshakes/s, "
                    f"p99 {result.latency_ms['total']['p99']:.1f} ms"
                )
        if request.reference == "openssl":
            accepted = next(i for i in identities if i.expected == "accepted")
            reference = openssl_s_time_rate(
                settings,
                accepted,
                seconds=max(3.0, results[-1].seconds),
                processes=results[-1].processes,
            )
    print_result(results[-1], console, reference=reference)
    if request.sweep:
        print_sweep(results, console)
    if report is not None:
        written = write_report(report, results, sweep=request.sweep, reference=reference)
        console.print(f"wrote {', '.join(str(p) for p in written)}")
    return results

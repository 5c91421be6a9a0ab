"""Handshake churn (``fleet bench handshake``) against our broker and a Mosquitto started from the
emitted config, same client, same identities, same run; ``openssl s_time -new`` beside each."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.broker import mosquitto
from broker import launched_broker
from device.handshake_bench import (
    BenchResult,
    BenchSettings,
    openssl_s_time_rate,
    run_handshake_bench,
)
from fleet import FleetConfig, Workspace, init_workspace
from fleet.cli.bench_identities import bench_identities


@dataclass
class HandshakeRow:
    broker: str
    mode: str
    result: BenchResult
    openssl: float | None = None


def _runs(
    broker: str, settings: BenchSettings, workspace: Workspace, connections: int
) -> list[HandshakeRow]:
    rows = []
    with bench_identities(workspace, connections) as identities:
        run_handshake_bench(settings, identities[:500])  # warm up the broker: not measured
        full = run_handshake_bench(settings, identities)
        reference = openssl_s_time_rate(
            settings, identities[0], seconds=max(5.0, full.seconds), processes=os.cpu_count() or 1
        )
        rows.append(HandshakeRow(broker, "full", full, reference))
        resumed = run_handshake_bench(replace(settings, resume=True), identities)
        rows.append(HandshakeRow(broker, "resumed", resumed))
    with bench_identities(workspace, connections, reject_mix=0.1) as identities:
        mixed = run_handshake_bench(settings, identities)
        rows.append(HandshakeRow(broker, "10% refused", mixed))
    return rows


def run(base: Path, *, connections: int = 5000, concurrency: int = 100) -> list[HandshakeRow]:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    init_workspace(base / "ws", config=FleetConfig())
    workspace = Workspace.open(base / "ws")
    # Mosquitto's emitted config pins TLS 1.2: both brokers are measured at 1.2.
    settings = BenchSettings(
        host="127.0.0.1",
        port=0,
        trust_anchor=workspace.paths.root_cert,
        concurrency=concurrency,
        tls_version="1.2",
    )
    with bench_identities(workspace, connections, reject_mix=0.1):
        pass  # provision every identity (and publish the CRL) before either broker starts
    rows = []
    with launched_broker(workspace.paths.root) as broker:
        rows += _runs("mtls-fleet", replace(settings, port=broker.port), workspace, connections)
    with mosquitto(workspace, base) as reference:
        if reference is not None:
            rows += _runs(
                reference.name, replace(settings, port=reference.port), workspace, connections
            )
    return rows

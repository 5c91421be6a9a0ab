"""What post-quantum TLS costs a fleet: ``fleet bench handshake`` for classical, hybrid and
ML-DSA chains against our broker, side by side, with ``openssl s_time -new`` on the classical
chain as the reference of the same run.

Chains: classical (ECDSA P-256 everywhere, P-256 key exchange, what devices offer by default);
hybrid (the same certificates, X25519MLKEM768 key exchange); ML-DSA leaves (ML-DSA-65 device
keys under the ECDSA CA, hybrid key exchange); all ML-DSA (ML-DSA-65 root, issuing CA, broker
and devices, hybrid key exchange). Each run is measured ``rounds`` times, alternating, so a
slow moment of the machine does not fall on one chain only.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from broker import launched_broker
from device.handshake_bench import (
    BenchResult,
    BenchSettings,
    openssl_s_time_rate,
    process_cpu_seconds,
    run_handshake_bench,
)
from fleet import FleetConfig, KeyType, Workspace, init_workspace
from fleet.cli.bench_identities import bench_identities

HYBRID = ("X25519MLKEM768",)


@dataclass(frozen=True)
class Chain:
    name: str
    workspace: str  # "classical" or "pq": which workspace (and so which CA and broker)
    key_type: KeyType
    groups: tuple[str, ...]


CHAINS = (
    Chain("classical", "classical", KeyType.EC_P256, ()),
    Chain("hybrid key exchange", "classical", KeyType.EC_P256, HYBRID),
    Chain("ML-DSA-65 leaves", "classical", KeyType.ML_DSA_65, HYBRID),
    Chain("all ML-DSA-65", "pq", KeyType.ML_DSA_65, HYBRID),
)


@dataclass
class ChainRow:
    chain: Chain
    results: list[BenchResult]  # one per round
    broker_cpu_ms: list[float]

    @property
    def rate(self) -> float:
        return sum(r.rate for r in self.results) / len(self.results)

    @property
    def client_cpu_ms(self) -> float:
        return 1000 * sum(r.cpu_seconds_per_handshake for r in self.results) / len(self.results)

    @property
    def broker_cpu(self) -> float:
        return sum(self.broker_cpu_ms) / len(self.broker_cpu_ms)

    @property
    def bytes(self) -> float:
        return sum(r.bytes_per_handshake for r in self.results) / len(self.results)

    @property
    def p99_ms(self) -> float:
        return max(r.latency_ms["total"]["p99"] for r in self.results)

    @property
    def negotiated(self) -> str:
        last = self.results[-1]
        return f"{'/'.join(last.groups)} · {'/'.join(last.broker_signatures)}"


@dataclass
class PostQuantumReport:
    rows: list[ChainRow]
    openssl_classical: float | None  # openssl s_time -new, classical chain, same broker


def _workspaces(base: Path) -> dict[str, Workspace]:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    made = {
        "classical": FleetConfig(),
        "pq": FleetConfig(
            key_type=KeyType.ML_DSA_65,
            ca_key_type=KeyType.ML_DSA_65,
            broker_key_type=KeyType.ML_DSA_65,
        ),
    }
    for name, config in made.items():
        init_workspace(base / name, config=config)
    return {name: Workspace.open(base / name) for name in made}


def run(
    base: Path, *, connections: int = 2000, concurrency: int = 100, rounds: int = 2
) -> PostQuantumReport:
    workspaces = _workspaces(base)
    rows = {chain.name: ChainRow(chain, [], []) for chain in CHAINS}
    reference = None
    for name, workspace in workspaces.items():
        chains = [chain for chain in CHAINS if chain.workspace == name]
        for chain in chains:  # every identity exists before the broker starts
            with bench_identities(workspace, connections, key_type=chain.key_type):
                pass
        with launched_broker(workspace.paths.root) as broker:
            settings = BenchSettings(
                host="127.0.0.1",
                port=broker.port,
                trust_anchor=workspace.paths.root_cert,
                concurrency=concurrency,
            )
            for _ in range(rounds):
                for chain in chains:
                    chain_settings = replace(
                        settings, groups=chain.groups, key_type=chain.key_type.value
                    )
                    with bench_identities(
                        workspace, connections, key_type=chain.key_type
                    ) as identities:
                        if not rows[chain.name].results:  # warm up: not measured
                            run_handshake_bench(chain_settings, identities[:300])
                        before = process_cpu_seconds(broker.process.pid)
                        result = run_handshake_bench(chain_settings, identities)
                        used = process_cpu_seconds(broker.process.pid) - before
                    rows[chain.name].results.append(result)
                    rows[chain.name].broker_cpu_ms.append(1000 * used / max(1, result.attempts))
            if name == "classical":  # as long as a classical run took, 2 s at least
                seconds = max(2.0, rows[CHAINS[0].name].results[-1].seconds)
                with bench_identities(workspace, connections, key_type=KeyType.EC_P256) as ids:
                    reference = openssl_s_time_rate(
                        settings, ids[0], seconds=seconds, processes=os.cpu_count() or 1
                    )
    report = PostQuantumReport(list(rows.values()), reference)
    _plot(report, base / "post_quantum.png")
    return report


def _plot(report: PostQuantumReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.chain.name for row in report.rows]
    panels = (
        ("handshakes/s", [row.rate for row in report.rows]),
        ("bytes on the wire per handshake", [row.bytes for row in report.rows]),
        ("client CPU ms per handshake", [row.client_cpu_ms for row in report.rows]),
        ("broker CPU ms per handshake", [row.broker_cpu for row in report.rows]),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4.5))
    for axis, (title, values) in zip(axes, panels, strict=True):
        axis.bar(range(len(values)), values, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"])
        axis.set_xticks(range(len(values)), names, rotation=25, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
    figure.suptitle("post-quantum TLS on this machine: mtls-fleet broker, fleet bench handshake")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

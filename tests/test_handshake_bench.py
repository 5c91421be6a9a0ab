"""``fleet bench handshake`` on small runs: the numbers of its report add up, the plots exist,
sweeps and comparisons work, and bad options are refused before anything runs."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fleet import FleetConfig, init_workspace
from tests.conftest import fleet_command


def _bench(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fleet_command("bench", *args), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench") / "fleet"
    init_workspace(directory, config=FleetConfig())
    return directory


def _consistent(run: dict[str, Any], connections: int) -> None:
    assert run["attempts"] == connections == sum(run["outcomes"].values())
    assert sum(run["by_expectation"].values()) == connections
    assert sum(run["per_second"]) == connections
    accepted = run["outcomes"].get("accepted", 0)
    assert run["rate"] == pytest.approx(accepted / run["seconds"])
    assert run["attempt_rate"] == pytest.approx(connections / run["seconds"])
    assert run["cpu_seconds_per_handshake"] > 0
    for phase, values in run["latency_ms"].items():
        ordered = [values[p] for p in ("p50", "p90", "p99", "p99.9", "max")]
        assert not any(math.isnan(v) for v in ordered), phase
        assert ordered == sorted(ordered), (phase, ordered)
        assert sum(count for _, count in run["histogram_ms"][phase]) == accepted, phase
    total_max = run["latency_ms"]["total"]["max"]
    for phase in ("tcp", "tls", "mqtt"):  # no phase takes longer than the longest whole
        assert run["latency_ms"][phase]["max"] <= total_max * 1.001, phase


def test_a_small_run_with_rejections_reports_consistent_numbers(
    bench_dir: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report"
    result = _bench(
        "handshake", "--dir", bench_dir, "--connections", "200", "--concurrency", "20",
        "--reject-mix", "15%", "--report", report,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads((report / "report.json").read_text())
    (run,) = document["runs"]
    _consistent(run, 200)
    expectations = run["by_expectation"]
    assert expectations == {
        "accepted -> accepted": 170,
        "expired -> rejected": 10,
        "revoked -> rejected": 10,
        "rogue-ca -> rejected": 10,
    }
    assert run["outcomes"]["rejected_by_broker: certificate_revoked"] == 10
    assert run["outcomes"]["rejected_by_broker: unknown_ca"] == 10
    for plot in ("latency_histogram.png", "rate_over_time.png"):
        data = (report / plot).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, plot
    assert "handshakes/s (accepted)" in result.stdout
    assert not list((bench_dir / "bench").glob("rogue-*"))  # the run's rogue CA is gone


@pytest.mark.slow
def test_resumption_and_a_sweep_then_compare(bench_dir: Path, tmp_path: Path) -> None:
    resumed, swept = tmp_path / "resumed", tmp_path / "swept"
    result = _bench(
        "handshake", "--dir", bench_dir, "--connections", "150", "--concurrency", "10",
        "--resume", "--tls", "1.2", "--processes", "1", "--report", resumed,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = json.loads((resumed / "report.json").read_text())["runs"]
    _consistent(run, 150)
    assert run["resumed"] == 150  # every connection resumed the session of its first one
    assert run["full"]["accepted"] == 150 and run["full"]["rate"] > 0

    result = _bench(
        "handshake", "--dir", bench_dir, "--connections", "100",
        "--sweep", "concurrency=2,8", "--report", swept,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads((swept / "report.json").read_text())
    assert [r["settings"]["concurrency"] for r in document["runs"]] == [2, 8]
    assert document["sweep"]["values"] == [2, 8]
    for run in document["runs"]:
        _consistent(run, 100)
    for plot in ("sweep_throughput.png", "sweep_p99.png"):
        assert (swept / plot).read_bytes().startswith(b"\x89PNG")
    assert "concurrency sweep" in result.stdout

    compared = _bench("compare", resumed, swept / "report.json", timeout=60)
    assert compared.returncode == 0, compared.stderr
    assert "handshakes/s (accepted)" in compared.stdout and "B/A" in compared.stdout


def test_ml_dsa_devices_over_the_hybrid_group_against_classical_then_compare(
    bench_dir: Path, tmp_path: Path
) -> None:
    classical, pq = tmp_path / "classical", tmp_path / "pq"
    for out, options in (
        (classical, ()),
        (pq, ("--key-type", "ml-dsa-65", "--groups", "X25519MLKEM768")),
    ):
        result = _bench(
            "handshake", "--dir", bench_dir, "--connections", "60", "--concurrency", "10",
            "--report", out, *options,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    (before,) = json.loads((classical / "report.json").read_text())["runs"]
    (after,) = json.loads((pq / "report.json").read_text())["runs"]
    for run in (before, after):
        _consistent(run, 60)
        assert run["broker_signatures"] == {"ecdsa_secp256r1_sha256": 60}  # the ECDSA broker
        assert run["broker_cpu_seconds_per_handshake"] > 0
    assert (before["settings"]["key_type"], before["settings"]["groups"]) == ("ec-p256", "P-256")
    assert before["groups"] == {"secp256r1": 60}
    assert (after["settings"]["key_type"], after["settings"]["groups"]) == (
        "ml-dsa-65",
        "X25519MLKEM768",
    )
    assert after["groups"] == {"X25519MLKEM768": 60}
    # an ML-DSA-65 certificate is ~4 KB (ECDSA: ~0.6 KB) and its signature 3,309 bytes (~72),
    # and the hybrid key share 1,216 bytes (P-256: 65)
    assert 3_000 < before["bytes_per_handshake"] < 7_000
    assert after["bytes_per_handshake"] > before["bytes_per_handshake"] + 8_000
    compared = _bench("compare", classical, pq, timeout=60)
    assert compared.returncode == 0, compared.stderr
    row = re.search(
        r"bytes/handshake\s*│\s*([\d,.]+)\s*│\s*([\d,.]+)\s*│\s*([\d.]+)", compared.stdout
    )
    assert row is not None, compared.stdout
    assert float(row[3]) > 2  # B/A
    assert "negotiated X25519MLKEM768 60" in compared.stdout


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--groups", "X25519,kyber"), "unknown key-exchange group 'kyber'"),
        (("--key-type", "ml-dsa-66"), "unknown key type 'ml-dsa-66'"),
        (("--tls", "1.1"), "invalid --tls '1.1'"),
        (("--reject-mix", "150%"), "invalid --reject-mix '150%'"),
        (("--sweep", "threads=1,2"), "invalid --sweep 'threads=1,2'"),
        (("--connections", "0"), "invalid --connections 0"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(
    bench_dir: Path, option: tuple[str, str], message: str
) -> None:
    result = _bench("handshake", "--dir", bench_dir, *option, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr

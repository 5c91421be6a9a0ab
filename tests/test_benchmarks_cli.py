"""``python -m benchmarks`` as the README shows it, scaled down: the options it documents
reach the runs (a benchmark's figures are never asserted, only that it ran what was asked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--dir", str(tmp_path / "bench"), *args],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
        env={"COLUMNS": "200", "PATH": "/usr/sbin:/usr/bin:/bin:/sbin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_churn_and_held_scale_the_broker_benchmark(tmp_path: Path) -> None:
    out = _bench(tmp_path, "--only", "broker", "--churn", "40", "--held", "30")
    churn = re.search(r"│ mtls-fleet broker\s*│\s*(\d+) │\s*(\d+) │", out)
    assert churn is not None, out
    assert churn.groups() == ("40", "0")  # 40 connects asked, none failed
    held = re.findall(r"│ mtls-fleet broker\s*│\s*(\d+) │\s*[\d,]+ │", out)
    assert "30" in held, out


@pytest.mark.slow
def test_swarm_seconds_and_held_scale_the_swarm_benchmark(tmp_path: Path) -> None:
    out = _bench(tmp_path, "--only", "swarm", "--held", "30", "--swarm-seconds", "3")
    title = "30 simulated devices held on the embedded broker (separate processes), ramp 300/s, "
    assert title + "QoS 1 every 10 s, for 3 s" in " ".join(out.split()), out  # the title wraps
    connected = re.search(r"│ connected at the deadline\s*│\s*(\d+) │\s*(\d+) │", out)
    assert connected is not None and connected.groups() == ("30", "30"), out


@pytest.mark.slow
def test_cluster_devices_and_seconds_scale_the_dask_comparison(tmp_path: Path) -> None:
    out = _bench(tmp_path, "--only", "cluster", "--cluster-devices", "40", "--cluster-seconds", "3")
    title = "40 devices on the embedded broker, QoS 1 every second, 3 s a run"
    assert title in " ".join(out.split()), out
    runs = re.findall(r"│ (--processes 2|2 Dask workers \(TLS\))\s*│\s*(\d+) / (\d+) │", out)
    assert [r[0] for r in runs] == ["--processes 2", "2 Dask workers (TLS)"] * 2, out
    assert all(r[1:] == ("40", "40") for r in runs), out
    assert "Dask / processes (means): connect rate" in out


@pytest.mark.slow
def test_pq_handshakes_scale_the_post_quantum_comparison(tmp_path: Path) -> None:
    out = _bench(tmp_path, "--only", "post-quantum", "--pq-handshakes", "40", "--pq-rounds", "1")
    title = " ".join(out.split())
    assert "post-quantum TLS: fleet bench handshake against our broker, 40 connections a run" in (
        title
    ), out
    assert "mean of 1 alternating round(s)" in title, out
    chains = re.findall(
        r"│ (classical|hybrid key exchange|ML-DSA-65 leaves|all ML-DSA-65)\s*│\s*(\S+) ·", out
    )
    assert chains == [
        ("classical", "secp256r1"),
        ("hybrid key exchange", "X25519MLKEM768"),
        ("ML-DSA-65 leaves", "X25519MLKEM768"),
        ("all ML-DSA-65", "X25519MLKEM768"),
    ], out
    plot = tmp_path / "bench" / "post-quantum" / "post_quantum.png"
    assert plot.read_bytes().startswith(b"\x89PNG")

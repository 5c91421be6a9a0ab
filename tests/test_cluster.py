"""The swarm on Dask distributed: certificates from the fleet CA for its mutual-TLS comms, a
LocalCluster of 2 worker processes, real 'dask scheduler' and 'dask worker' processes started
as a user would, and a worker killed mid-run."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from broker import launched_broker
from device.cluster import run_swarm_on_cluster
from device.stats import SwarmStats
from device.swarm import SwarmConfig
from fleet import FleetConfig, ProvisionSpec, Workspace, init_workspace, provision_devices
from fleet.store.cluster_certs import ClusterCertificates, issue_cluster_certificates
from tests.broker_support import free_port
from tests.conftest import fleet_command, openssl
from tests.observability_support import connected_swarm, stop_process

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DASK = str(Path(sys.executable).parent / "dask")


def test_fleet_cluster_certs_writes_what_dask_needs(workspace: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "certs"
    made = subprocess.run(
        fleet_command("cluster", "certs", "--dir", workspace.paths.root, "--out", out,
                      "--host", "sched.lan", "--host", "10.0.0.7", "--valid-for", "1d"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert f"dask scheduler --tls-ca-file {out / 'ca.pem'}" in made.stdout
    files = ClusterCertificates(out)
    assert files.missing() == []
    assert out.stat().st_mode & 0o777 == 0o700
    for role in ("scheduler", "worker", "client"):
        assert files.key(role).stat().st_mode & 0o777 == 0o600
        cert = x509.load_pem_x509_certificate(files.cert(role).read_bytes())
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert dt.timedelta(days=1) <= lifetime <= dt.timedelta(days=1, minutes=2)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(n.value) for n in names] == ["sched.lan", "10.0.0.7"]
        for purpose in ("sslserver", "sslclient"):  # Dask peers are both
            verified = openssl(
                "verify", "-CAfile", str(files.ca), "-untrusted", str(files.cert(role)),
                "-purpose", purpose, str(files.cert(role)),
            )  # fmt: skip
            assert verified.stdout.strip().endswith(": OK")


def test_a_scheduler_must_be_tls_and_the_client_certificate_present(
    workspace: Workspace, tmp_path: Path
) -> None:
    provision_devices(workspace, ProvisionSpec(count=2))
    root = workspace.paths.root
    for scheduler, certs, said in [
        ("tcp://127.0.0.1:8786", tmp_path, "only a mutual-TLS scheduler is accepted"),
        ("tls://127.0.0.1:8786", tmp_path / "none", "missing ca.pem, scheduler.pem"),
    ]:
        ran = subprocess.run(
            fleet_command("swarm", "--dir", root, "--devices", "2", "--scheduler", scheduler,
                          "--cluster-certs", certs),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert ran.returncode == 2 and said in " ".join(ran.stderr.split()), ran.stderr


@pytest.mark.slow
def test_a_local_tls_cluster_runs_2000_devices_and_the_summary_is_the_sum_of_its_shards(
    workspace: Workspace, tmp_path: Path
) -> None:
    from distributed import Client

    ids = provision_devices(workspace, ProvisionSpec(count=2000)).device_ids
    files = issue_cluster_certificates(workspace, tmp_path / "certs")
    with (
        launched_broker(workspace.paths.root) as broker,
        files.local_cluster() as cluster,
        Client(cluster.scheduler_address, security=files.security()) as client,
    ):  # fmt: skip
        # a client whose certificate another CA issued is refused in the handshake
        init_workspace(tmp_path / "other", config=FleetConfig())
        other = issue_cluster_certificates(Workspace.open(tmp_path / "other"), tmp_path / "o")
        from distributed.security import Security

        stranger = Security(
            tls_ca_file=str(files.ca), tls_client_cert=str(other.cert("client")),
            tls_client_key=str(other.key("client")), require_encryption=True,
        )  # fmt: skip
        with pytest.raises((OSError, TimeoutError)):
            Client(cluster.scheduler_address, security=stranger, timeout="3s")
        config = SwarmConfig(
            workspace=workspace.paths.root, device_ids=tuple(ids), port=broker.port,
            ramp_per_second=500, publish_every=1.0, qos=1, duration=20.0, max_in_flight=50,
        )  # fmt: skip
        run = run_swarm_on_cluster(config, client)
    stats, shards = run.stats, run.shards
    assert len(shards) == 2 and len(set(run.workers)) == 2
    assert stats.devices == 2000 == sum(s["devices"] for s in shards.values())
    assert stats.attempts == sum((Counter(s["attempts"]) for s in shards.values()), Counter())
    assert stats.attempts["connected"] >= 2000
    assert stats.details == sum((Counter(s["details"]) for s in shards.values()), Counter())
    assert stats.sent == sum(s["sent"] for s in shards.values()) > 2000
    assert stats.acknowledged == sum(s["acknowledged"] for s in shards.values())
    histograms = [SwarmStats.merge([s]).handshake.get_total_count() for s in shards.values()]
    assert stats.handshake.get_total_count() == sum(histograms) == stats.attempts["connected"]
    assert stats.connected_at_deadline == 2000
    assert stats.lost_shards == []


@contextmanager
def _dask_cluster(
    files: ClusterCertificates, sources: list[str | None]
) -> Iterator[tuple[str, list[Any]]]:
    """'dask scheduler' and one 'dask worker' per item of ``sources`` (its FLEET_SOURCE_IPS, or
    None), as a user starts them (no nanny, so a worker is one process to kill); yields the
    scheduler's address and the worker processes."""
    tls = ["--tls-ca-file", str(files.ca)]
    started: list[subprocess.Popen[str]] = []
    try:
        scheduler = subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--protocol", "tls",
             "--no-dashboard", *tls, "--tls-cert", str(files.cert("scheduler")),
             "--tls-key", str(files.key("scheduler"))],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(scheduler)
        address = _wait_for_line(scheduler, "Scheduler at:").split()[-1]
        assert address.startswith("tls://127.0.0.1:")
        procs = []
        for source in sources:
            env = dict(os.environ, **({"FLEET_SOURCE_IPS": source} if source else {}))
            worker = subprocess.Popen(
                [DASK, "worker", address, "--no-nanny", "--nthreads", "1", "--no-dashboard",
                 "--host", "127.0.0.1", *tls, "--tls-cert", str(files.cert("worker")),
                 "--tls-key", str(files.key("worker"))],
                stderr=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            started.append(worker)
            _wait_for_line(worker, "Registered to:")
            procs.append(worker)
        yield address, procs
    finally:
        for process in reversed(started):
            stop_process(process)


def _wait_for_line(process: subprocess.Popen[str], marker: str) -> str:
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            return line.strip()
    raise AssertionError(f"no {marker!r} from {process.args!r}: {''.join(seen)[-2000:]}")


@pytest.mark.slow
def test_real_dask_processes_run_the_swarm_and_a_worker_killed_mid_run_loses_only_its_shard(
    workspace: Workspace, tmp_path: Path
) -> None:
    provision_devices(workspace, ProvisionSpec(count=200))
    root = workspace.paths.root
    certs = tmp_path / "certs"
    made = subprocess.run(
        fleet_command("cluster", "certs", "--dir", root, "--out", certs),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    files = ClusterCertificates(certs)
    web = free_port()
    summary = tmp_path / "summary.json"
    log = (tmp_path / "broker.log").open("w+")
    with (
        launched_broker(root, "--log-connections", stderr=log) as broker,
        _dask_cluster(files, ["127.0.0.5", None]) as (address, workers),
    ):
        swarm = subprocess.Popen(
            fleet_command("swarm", "--dir", root, "--devices", "200", "--target", broker.target,
                          "--scheduler", address, "--cluster-certs", certs, "--duration", "25s",
                          "--ramp", "200/s", "--publish-every", "1s", "--quiet",
                          "--web", str(web), "--json", summary),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            said = connected_swarm(swarm, web, 200)
            victim = workers[1]
            os.kill(victim.pid, signal.SIGKILL)  # the machine is gone, not asked to leave
            victim.wait(10)
            rest, _ = swarm.communicate(timeout=120)
            output = "".join(said) + rest
        finally:
            if swarm.poll() is None:
                swarm.kill()
                swarm.wait()
    assert swarm.returncode == 0, output
    assert "2 Dask worker(s) of tls://127.0.0.1:" in output
    result = json.loads(summary.read_text())
    (lost,) = result["lost_shards"]
    assert (lost["devices"], lost["why"]) == (100, "worker lost mid-run")
    assert lost["worker"].startswith("tls://127.0.0.1:")
    assert "lost with their worker" in output and lost["worker"] in output
    assert result["lost_devices"] == 100 and result["devices"] == 200
    # the surviving shard ran to the deadline: its 100 devices were connected at the end
    assert result["connected_at_deadline"] == 100
    assert result["outcomes"]["connected"] >= 200
    # the first worker connected its shard from its own FLEET_SOURCE_IPS, the other from the
    # default address
    log.seek(0)
    connected = [json.loads(line[line.index("{") :]) for line in log if '"connected"' in line]
    by_source = Counter(event["peer"].rsplit(":", 1)[0] for event in connected)
    assert set(by_source) == {"127.0.0.5", "127.0.0.1"}
    sources = {e["device"] for e in connected if e["peer"].startswith("127.0.0.5:")}
    assert len(sources) == 100


@pytest.mark.slow
def test_the_handshake_bench_on_a_local_tls_cluster_reports_as_with_processes(
    workspace: Workspace, tmp_path: Path
) -> None:
    from tests.test_handshake_bench import _consistent

    certs = tmp_path / "certs"
    files = issue_cluster_certificates(workspace, certs)
    report = tmp_path / "report"
    with files.local_cluster() as cluster:
        ran = subprocess.run(
            fleet_command("bench", "handshake", "--dir", workspace.paths.root,
                          "--connections", "200", "--concurrency", "20", "--reject-mix", "15%",
                          "--scheduler", cluster.scheduler_address, "--cluster-certs", certs,
                          "--report", report),
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (run,) = json.loads((report / "report.json").read_text())["runs"]
    _consistent(run, 200)
    assert run["processes"] == 2  # one shard per worker
    assert run["by_expectation"] == {
        "accepted -> accepted": 170,
        "expired -> rejected": 10,
        "revoked -> rejected": 10,
        "rogue-ca -> rejected": 10,
    }
    assert run["outcomes"]["rejected_by_broker: certificate_revoked"] == 10


@pytest.mark.slow
def test_ctrl_c_stops_every_shard_on_the_cluster_and_still_prints_the_summary(
    workspace: Workspace, tmp_path: Path
) -> None:

    provision_devices(workspace, ProvisionSpec(count=60))
    certs = tmp_path / "certs"
    files = issue_cluster_certificates(workspace, certs)
    web = free_port()
    summary = tmp_path / "summary.json"
    with (
        launched_broker(workspace.paths.root) as broker,
        files.local_cluster() as cluster,
    ):  # fmt: skip
        swarm = subprocess.Popen(
            fleet_command("swarm", "--dir", workspace.paths.root, "--devices", "60",
                          "--target", broker.target, "--scheduler", cluster.scheduler_address,
                          "--cluster-certs", certs, "--duration", "10m", "--quiet",
                          "--web", str(web), "--json", summary),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            said = connected_swarm(swarm, web, 60)
            swarm.send_signal(signal.SIGINT)
            rest, _ = swarm.communicate(timeout=60)  # not the 10 minutes asked
        finally:
            if swarm.poll() is None:
                swarm.kill()
                swarm.wait()
    output = "".join(said) + rest
    assert swarm.returncode == 130, output
    assert "interrupted: the summary covers what happened until Ctrl-C" in output
    result = json.loads(summary.read_text())
    assert result["interrupted"] is True and result["lost_shards"] == []
    assert result["outcomes"]["connected"] >= 60 and result["devices"] == 60

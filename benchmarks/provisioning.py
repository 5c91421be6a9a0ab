"""Provisioning throughput: ``provision_devices`` beside bare references measured in the same run.

* ``fleet provision``: keys, certificates, files and registry rows, into a fresh workspace;
* bare cryptography: generate a key, issue and sign a certificate, serialise both (no files);
* bare file system: the same directory and two files per device with dummy bytes (no crypto).

The two references bound what provisioning can reach on this machine: it does both jobs.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet import FleetConfig, ProvisionSpec, Workspace, init_workspace, provision_devices


@dataclass(frozen=True)
class Figure:
    name: str
    count: int
    seconds: float
    processes: int

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def _bare_crypto(count: int) -> int:
    """Issue-and-serialise ``count`` EC P-256 device certificates with plain cryptography."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = dt.datetime.now(dt.UTC)
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"d-{i}")]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=90))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert.public_bytes(serialization.Encoding.PEM)
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return count


def _bare_files(args: tuple[str, int, int]) -> int:
    """Create ``count`` device directories with a 241-byte key and a 1.5 KB chain each."""
    base, start, count = args
    key, chain = b"k" * 241, b"c" * 1530
    for i in range(start, start + count):
        directory = os.path.join(base, f"d-{i:06d}")
        os.mkdir(directory, 0o700)
        for name, data, mode in (("key.pem", key, 0o600), ("cert.pem", chain, 0o644)):
            fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            os.write(fd, data)
            os.close(fd)
    return count


def _timed(name: str, count: int, processes: int, work: Callable[[], object]) -> Figure:
    started = time.perf_counter()
    work()
    return Figure(name, count, time.perf_counter() - started, processes)


def _in_parallel(function: Callable[[int], int], count: int, processes: int) -> None:
    share = count // processes
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(function, [share] * processes))


def run(root: Path, *, count: int = 10_000) -> list[Figure]:
    """Measure and return the figures, in a fresh directory under ``root``.

    Earlier runs are removed only after measuring: on this machine's ext4 (mounted with
    ``discard``), creating files right after deleting tens of thousands is several times
    slower, which would measure the deletion rather than provisioning.
    """
    previous = [p for p in root.glob("run-*") if p.is_dir()] if root.exists() else []
    base = root / f"run-{time.time_ns()}"
    base.mkdir(parents=True)
    cores = os.cpu_count() or 1
    figures = []

    workspace_dir = base / "provision"
    init_workspace(workspace_dir, config=FleetConfig())
    workspace = Workspace.open(workspace_dir)
    result = provision_devices(workspace, ProvisionSpec(count=count, prefix="bench"))
    figures.append(
        Figure(
            "fleet provision (keys, certs, files, registry)",
            count,
            result.elapsed_s,
            result.workers,
        )
    )

    sample = max(1, count // 5)
    figures.append(
        _timed("bare cryptography issue+serialise", sample, 1, lambda: _bare_crypto(sample))
    )
    figures.append(
        _timed(
            "bare cryptography issue+serialise",
            count,
            cores,
            lambda: _in_parallel(_bare_crypto, count, cores),
        )
    )
    files_dir = base / "files"
    files_dir.mkdir()
    share = count // cores

    def _files_in_parallel() -> None:
        with ProcessPoolExecutor(cores) as pool:
            list(pool.map(_bare_files, [(str(files_dir), k * share, share) for k in range(cores)]))

    figures.append(
        _timed("bare file system mkdir + 2 files", share * cores, cores, _files_in_parallel)
    )
    for old in previous:
        shutil.rmtree(old, ignore_errors=True)
    return figures

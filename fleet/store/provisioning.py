"""Provisioning: many devices at once, each with its own key and certificate, all or nothing.

The protocol that keeps registry and files in agreement whatever happens:

1. under the workspace's ``provision`` lock, the batch is recorded as *pending* (one transaction);
2. keys, certificates and files are produced, on every core, into ``devices/<id>/``;
3. the batch becomes *active* (one transaction) and only now shows in the inventory.

A run stopped by Ctrl-C or SIGTERM removes its files and rows before it exits. A run killed
outright leaves pending rows behind; the next command that opens the workspace finds them and
rolls them back the same way (files first, rows last, so a crash during a rollback is resumed).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fleet.kernel.errors import (
    NameTakenError,
    ProvisioningInterrupted,
    RequestRefused,
    UsageError,
)
from fleet.kernel.files import PRIVATE_DIR_MODE, write_public, write_secret
from fleet.kernel.identity import DeviceIdentity, validate_device_id, validate_env, validate_tier
from fleet.kernel.keys import (
    KeyType,
    generate_private_key,
    key_type_of,
    load_private_key,
    private_key_pem,
)
from fleet.kernel.signals import StopRequest, stop_on_signals
from fleet.store.ca import CertificateAuthority
from fleet.store.records import Enrollment, NewDevice
from fleet.store.workspace import Workspace

ProgressCallback = Callable[[int, int], None]

# Below this many devices a worker pool costs more than it saves.
_POOL_THRESHOLD = 256


@dataclass(frozen=True, slots=True)
class ProvisionSpec:
    """What ``fleet provision`` asks for. ``None`` fields take the workspace defaults."""

    count: int
    prefix: str = "device"
    tier: str = "bronze"
    env: str = "prod"
    valid_for: dt.timedelta | None = None
    not_before: dt.datetime | None = None
    key_type: KeyType | None = None

    def validate(self) -> None:
        if self.count < 1:
            raise UsageError(f"invalid count {self.count}: give a positive number of devices")
        validate_device_id(f"{self.prefix}-1")
        validate_tier(self.tier)
        validate_env(self.env)
        if self.valid_for is not None and self.valid_for <= dt.timedelta(0):
            raise UsageError("invalid validity: --valid-for must be longer than zero")


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    device_ids: list[str]
    not_before: dt.datetime
    not_after: dt.datetime
    elapsed_s: float
    workers: int = field(default=1)


@dataclass(frozen=True, slots=True)
class _ChunkJob:
    """One unit of work for a worker: serialisable, so any pool start method can carry it."""

    devices_dir: str
    devices: list[tuple[str, int]]
    tier: str
    env: str
    trust_domain: str
    key_type: KeyType
    not_before: dt.datetime
    not_after: dt.datetime


def provision_devices(
    workspace: Workspace,
    spec: ProvisionSpec,
    *,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    now: dt.datetime | None = None,
) -> ProvisionResult:
    """Create ``spec.count`` devices; either all of them exist afterwards, or none.

    ``workers`` defaults to one process per core. Raises :class:`ProvisioningInterrupted` after
    rolling back when interrupted (Ctrl-C, SIGTERM).
    """
    spec.validate()
    started = time.perf_counter()
    now = now or dt.datetime.now(dt.UTC)
    not_before = (spec.not_before or now).replace(microsecond=0)
    not_after = not_before + (spec.valid_for or workspace.config.device_valid_for)
    key_type = spec.key_type or workspace.config.key_type
    workers = max(1, workers or os.cpu_count() or 1)
    with workspace.lock("provision"), stop_on_signals() as stop:
        workspace.roll_back_pending()
        registry = workspace.registry
        first = registry.next_sequence(spec.prefix)
        width = max(5, len(str(first + spec.count - 1)))
        ids = [f"{spec.prefix}-{n:0{width}d}" for n in range(first, first + spec.count)]
        devices = [
            NewDevice(
                device_id=device_id,
                serial=x509.random_serial_number(),
                tier=spec.tier,
                env=spec.env,
                key_type=key_type.value,
                key_source="generated",
                not_before=not_before,
                not_after=not_after,
            )
            for device_id in ids
        ]
        batch_id = uuid.uuid4().hex
        registry.add_pending(batch_id, devices, now=now)
        try:
            job = _ChunkJob(
                devices_dir=str(workspace.paths.devices_dir),
                devices=[(d.device_id, d.serial) for d in devices],
                tier=spec.tier,
                env=spec.env,
                trust_domain=workspace.config.trust_domain,
                key_type=key_type,
                not_before=not_before,
                not_after=not_after,
            )
            stop.check()
            used = _run_jobs(workspace.ca, job, workers=workers, progress=progress, stop=stop)
            registry.activate_batch(batch_id)
        except BaseException as exc:
            rolled_back = workspace.roll_back_pending(batch_id)
            if isinstance(exc, KeyboardInterrupt):
                raise ProvisioningInterrupted(
                    f"provisioning interrupted: rolled back the {rolled_back} unfinished devices; "
                    "the registry and the devices directory are as they were before the run"
                ) from None
            raise
    return ProvisionResult(
        device_ids=ids,
        not_before=not_before,
        not_after=not_after,
        elapsed_s=time.perf_counter() - started,
        workers=used,
    )


def provision_from_csr(
    workspace: Workspace,
    csr_pem: bytes,
    *,
    device_id: str,
    tier: str = "bronze",
    env: str = "prod",
    valid_for: dt.timedelta | None = None,
    not_before: dt.datetime | None = None,
    now: dt.datetime | None = None,
    enrollment: Enrollment | None = None,
) -> x509.Certificate:
    """Sign a device-generated CSR for ``device_id``; the device keeps its private key.

    Only ``cert.pem`` is written. Subject and extensions come from the fleet, never the CSR.
    With ``enrollment`` the device becomes visible in the same transaction that spends a use
    of its claim (see :meth:`Registry.activate_enrollment`).
    """
    validate_device_id(device_id)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise UsageError(f"device {device_id!r}: the file is not a PEM CSR ({exc})") from exc
    now = now or dt.datetime.now(dt.UTC)
    start = (not_before or now).replace(microsecond=0)
    end = start + (valid_for or workspace.config.device_valid_for)
    identity = DeviceIdentity(
        device_id=device_id, tier=tier, env=env, trust_domain=workspace.config.trust_domain
    )
    cert = workspace.ca.sign_csr(csr, identity, not_before=start, not_after=end)
    with workspace.lock("provision"), stop_on_signals():
        workspace.roll_back_pending()
        if workspace.registry.taken_ids([device_id]):
            if enrollment is not None:
                raise RequestRefused("id_taken", f"device id {device_id!r} is already enrolled")
            raise NameTakenError(
                f"device {device_id!r} already exists; choose another --id", field="id"
            )
        batch_id = uuid.uuid4().hex
        record = NewDevice(
            device_id=device_id,
            serial=cert.serial_number,
            tier=tier,
            env=env,
            key_type=key_type_of(csr.public_key()).value,
            key_source="csr",
            not_before=start,
            not_after=end,
        )
        workspace.registry.add_pending(batch_id, [record], now=now)
        try:
            directory = workspace.paths.device_dir(device_id)
            directory.mkdir(mode=PRIVATE_DIR_MODE)
            write_public(directory / "cert.pem", workspace.ca.chain_pem(cert))
            if enrollment is None:
                workspace.registry.activate_batch(batch_id)
            else:
                workspace.registry.activate_enrollment(batch_id, enrollment)
        except BaseException:
            workspace.roll_back_pending(batch_id)
            raise
    return cert


# -- producing keys, certificates and files ---------------------------------------------------

_worker_ca: CertificateAuthority | None = None


def _init_worker(
    parent_pid: int | None,
    root_pem: bytes,
    issuing_pem: bytes,
    issuing_key_pem: bytes,
    crl_url: str | None,
) -> None:
    global _worker_ca
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides how to stop, not us
    _die_with_parent(parent_pid)
    _worker_ca = CertificateAuthority(
        root_cert=x509.load_pem_x509_certificate(root_pem),
        issuing_cert=x509.load_pem_x509_certificate(issuing_pem),
        issuing_key=load_private_key(issuing_key_pem, source="issuing key"),
        crl_distribution_url=crl_url,
    )


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to kill this worker when its parent dies (e.g. ``kill -9`` of ``fleet``).

    Without it an orphaned worker could go on writing files while the next command rolls the
    dead run back. Elsewhere the inherited ``provision`` lock still keeps the rollback waiting.
    ``parent_pid`` is None for workers of a fork server (their parent is the server, which
    exits with ``fleet``).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)


def _run_in_worker(job: _ChunkJob) -> int:
    assert _worker_ca is not None, "worker started without its CA"
    return _write_devices(_worker_ca, job)


def _write_devices(ca: CertificateAuthority, job: _ChunkJob) -> int:
    template = ca.device_template(
        key_type=job.key_type, not_before=job.not_before, not_after=job.not_after
    )
    issuing_pem = ca.issuing_pem
    for device_id, serial in job.devices:
        identity = DeviceIdentity(
            device_id=device_id, tier=job.tier, env=job.env, trust_domain=job.trust_domain
        )
        key = generate_private_key(job.key_type)
        cert = template.issue(identity, key.public_key(), serial=serial)
        directory = os.path.join(job.devices_dir, device_id)
        os.mkdir(directory, PRIVATE_DIR_MODE)
        write_secret(os.path.join(directory, "key.pem"), private_key_pem(key))
        write_public(
            os.path.join(directory, "cert.pem"), cert.public_bytes(Encoding.PEM) + issuing_pem
        )
    return len(job.devices)


def _split(job: _ChunkJob, pieces: int) -> list[_ChunkJob]:
    size = max(1, -(-len(job.devices) // pieces))
    return [
        replace(job, devices=job.devices[start : start + size])
        for start in range(0, len(job.devices), size)
    ]


def _run_jobs(
    ca: CertificateAuthority,
    job: _ChunkJob,
    *,
    workers: int,
    progress: ProgressCallback | None,
    stop: StopRequest,
) -> int:
    """Produce every device of ``job``; returns the number of processes used."""
    total = len(job.devices)
    if workers == 1 or total < _POOL_THRESHOLD:
        done = 0
        for chunk in _split(job, max(1, total // 100)):
            stop.check()
            done += _write_devices(ca, chunk)
            if progress:
                progress(done, total)
        return 1
    # Small chunks keep progress smooth and an interrupt prompt; large enough to amortise IPC.
    chunks = _split(job, max(workers * 4, total // 250))
    fork = _single_threaded()
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("fork" if fork else "forkserver"),
        initializer=_init_worker,
        initargs=(
            os.getpid() if fork else None,
            ca.root_cert.public_bytes(Encoding.PEM),
            ca.issuing_pem,
            private_key_pem(ca.issuing_key),
            ca.crl_distribution_url,
        ),
    )
    try:
        pending: set[Future[int]] = {pool.submit(_run_in_worker, chunk) for chunk in chunks}
        done = 0
        while pending:
            stop.check()
            finished, pending = wait(pending, timeout=0.1, return_when="FIRST_COMPLETED")
            for future in finished:
                done += future.result()  # re-raises a worker's error here
            if progress:
                progress(done, total)
    finally:
        # On error or Ctrl-C: drop queued chunks and wait for running ones, so no worker is
        # still writing files while the rollback removes them.
        pool.shutdown(wait=True, cancel_futures=True)
    return workers


def _single_threaded() -> bool:
    # fork is fastest, but forking a process that runs other threads can deadlock the child.
    return threading.active_count() == 1

"""The swarm on Dask distributed (``fleet swarm --scheduler tls://HOST:8786``).

The fleet is split into one shard per worker; each shard is one long-running task pinned to its
worker, running the same :class:`~device.swarm.Swarm` as a ``--processes`` shard. Identities
travel with the task (each device's chain and key, and the root), over Dask's comms, which the
caller secures with mutual TLS (certificates from ``fleet cluster certs``); the worker writes
them to a private temporary directory (0700, keys 0600) for the run and removes it after.

While shards run, each keeps its latest statistics (four times a second) in a Dask ``Variable``
of its own: latest wins, so nothing piles up at the scheduler however slow the reader (a queue
or the scheduler's event log would keep every snapshot). The client merges the latest of every
shard into one live view, and the final ones (the tasks' results) into the summary. Ctrl-C sets a Dask event every shard watches: they drain,
disconnect and return. A worker that disappears mid-run loses its shard: its devices are
reported as lost with the worker's address (what the shard had reported until then is kept),
the others carry on, and the run still ends with a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from device.handshake_bench import (
    BenchError,
    BenchResult,
    BenchSettings,
    Identity,
    ShardResult,
    bench_result,
    run_bench_shard,
)
from device.stats import SwarmStats
from device.swarm import (
    ProgressCallback,
    Swarm,
    SwarmConfig,
    SwarmError,
    event_loop_runner,
    split,
    tune_for_many_devices,
)
from fleet.kernel.addresses import parse_source_ips
from fleet.kernel.files import PRIVATE_DIR_MODE, write_public, write_secret
from fleet.kernel.signals import stop_on_signals
from fleet.store.workspace import WorkspacePaths

SOURCE_IPS_VARIABLE = "FLEET_SOURCE_IPS"  # set where 'dask worker' starts: its own --source-ips
PROGRESS_EVERY = 0.25
_WATCH_EVERY = 0.5  # how often the client looks for lost workers, a shard for the stop event
_ANSWER_GRACE = 120.0
_BENCH_LEAD = 3.0  # seconds for the identities to reach the workers before the churn starts  # past the run's duration, shards still silent are reported lost


@dataclass(frozen=True, slots=True)
class ShardIdentities:
    """What a worker needs to be a shard's devices: the root and each device's chain and key."""

    root_pem: bytes
    devices: tuple[tuple[str, bytes, bytes], ...]  # (device id, chain PEM, key PEM)

    @classmethod
    def read(cls, workspace: Path, device_ids: tuple[str, ...]) -> ShardIdentities:
        paths = WorkspacePaths(workspace)
        return cls.from_files(
            paths.root_cert, [(i, paths.device_cert(i), paths.device_key(i)) for i in device_ids]
        )

    @classmethod
    def from_files(
        cls, root_cert: Path, entries: Sequence[tuple[str, Path, Path]]
    ) -> ShardIdentities:
        """From ``(device id, chain file, key file)`` entries (ids unique in one shard)."""
        return cls(
            root_cert.read_bytes(),
            tuple((i, cert.read_bytes(), key.read_bytes()) for i, cert, key in entries),
        )

    def write(self, directory: Path) -> Path:
        """Lay them out as a workspace under ``directory`` (keys 0600); returns its root."""
        paths = WorkspacePaths(directory / "fleet")
        paths.root_cert.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
        write_public(paths.root_cert, self.root_pem)
        for device_id, chain, key in self.devices:
            paths.device_cert(device_id).parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
            write_public(paths.device_cert(device_id), chain)
            write_secret(paths.device_key(device_id), key)
        return paths.root


def run_shard(config: SwarmConfig, identities: ShardIdentities, run: str, index: int) -> Any:
    """The task on a worker: run one shard, publishing progress, and return its final stats.

    Dask reschedules the tasks of a lost worker on another; a shard does not start twice (its
    devices would connect from two places): the second start finds the first's claim and
    returns ``None``.
    """
    from distributed import Event, Variable, get_worker

    host = get_worker()
    worker = host.address
    tune_for_many_devices()  # the worker process is the shard's, as a --processes one is
    _stop_worker_profiler(host)
    own_sources = os.environ.get(SOURCE_IPS_VARIABLE)
    if own_sources:  # this worker's addresses, e.g. to pass ~28,000 connections per address
        config = replace(config, source_ips=parse_source_ips(own_sources, what=SOURCE_IPS_VARIABLE))
    claim = Variable(claim_name(run, index))
    if claim.get(timeout=10):  # the client set it to "" before submitting
        return None
    claim.set(worker)
    progress = Variable(progress_name(run, index))
    stop_event = Event(f"{run}-stop")

    async def main(root: Path) -> SwarmStats:
        stop = asyncio.Event()
        sending: list[asyncio.Future[None]] = []

        def publish(stats: SwarmStats) -> None:
            """Off the loop (a scheduler round trip); one at a time, the newest wins."""
            if sending and not sending[0].done():
                return
            sending[:] = [asyncio.ensure_future(asyncio.to_thread(progress.set, stats.to_wire()))]

        async def watch() -> None:
            while not stop.is_set():
                if await asyncio.to_thread(stop_event.is_set):
                    stop.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), _WATCH_EVERY)

        watcher = asyncio.create_task(watch())
        try:
            return await Swarm(replace(config, workspace=root)).run(
                stop,
                on_progress=publish,
                progress_every=PROGRESS_EVERY,
            )
        finally:
            stop.set()
            await asyncio.gather(watcher, *sending, return_exceptions=True)

    with tempfile.TemporaryDirectory(prefix="fleet-shard-") as directory:
        os.chmod(directory, PRIVATE_DIR_MODE)
        final = event_loop_runner()(main(identities.write(Path(directory))))
    return final.to_wire()


def _stop_worker_profiler(worker: Any) -> None:
    """Dask's statistical profiler walks the running task's stack every 10 ms: on a shard (an
    event loop over thousands of devices, for minutes) it took GIL time from the devices (py-spy
    on a worker: ``Worker.trigger_profile`` on the worker's loop). Stopped for the worker's
    life, on its own loop (tornado callbacks are not thread-safe); the equivalent at start is
    ``DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False``."""
    for name in ("profile", "profile-cycle"):
        callback = worker.periodic_callbacks.pop(name, None)
        if callback is not None:
            worker.loop.add_callback(callback.stop)


def bench_shard(
    settings: BenchSettings,
    identities: ShardIdentities,
    expected: tuple[str, ...],
    start_at: float,
) -> list[ShardResult]:
    """The handshake bench's task on a worker: one shard's churn from ``start_at`` (wall
    clock: the machines' clocks must agree, as NTP keeps them, to well under a second)."""
    from distributed import get_worker

    _stop_worker_profiler(get_worker())
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as directory:
        os.chmod(directory, PRIVATE_DIR_MODE)
        paths = WorkspacePaths(identities.write(Path(directory)))
        shard = [
            Identity(device_id, paths.device_cert(device_id), paths.device_key(device_id), why)
            for (device_id, _, _), why in zip(identities.devices, expected, strict=True)
        ]
        return run_bench_shard(replace(settings, trust_anchor=paths.root_cert), shard, start_at)


def run_handshake_bench_on_cluster(
    settings: BenchSettings, identities: list[Identity], client: Any
) -> BenchResult:
    """``fleet bench handshake --scheduler``: the identities split over the workers of
    ``client``, one shard each pinned to its worker, ``concurrency`` in flight overall; the
    merged result is the same as with processes."""
    if not identities:
        raise BenchError("no identities to connect with")
    workers = cluster_workers(client)
    if not workers:
        raise BenchError(f"the Dask scheduler {client.scheduler.address} has no workers")
    count = min(len(workers), len(identities))
    shards = [identities[i::count] for i in range(count)]
    shard_settings = replace(settings, concurrency=max(1, settings.concurrency // count))
    start_at = time.time() + _BENCH_LEAD + len(identities) / count * 0.0005  # contexts first
    futures = [
        client.submit(
            bench_shard,
            shard_settings,
            ShardIdentities.from_files(
                settings.trust_anchor, [(i.device_id, i.cert, i.key) for i in shard]
            ),
            tuple(i.expected for i in shard),
            start_at,
            workers=[worker],
            allow_other_workers=False,
            pure=False,
        )
        for shard, worker in zip(shards, workers, strict=False)
    ]
    return bench_result(client.gather(futures), settings, count)


def progress_name(run: str, index: int) -> str:
    return f"{run}-progress-{index}"


def claim_name(run: str, index: int) -> str:
    return f"{run}-shard-{index}"


def cluster_workers(client: Any) -> list[str]:
    return sorted(client.scheduler_info(n_workers=-1)["workers"])


@dataclass(frozen=True, slots=True)
class ClusterRun:
    """A run's merged statistics, and what each shard reported last (its final stats when it
    finished), with the worker it ran on."""

    stats: SwarmStats
    shards: dict[int, dict[str, Any]]
    workers: list[str]


def run_swarm_on_cluster(
    config: SwarmConfig,
    client: Any,
    *,
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[], None] | None = None,
) -> ClusterRun:
    """Run ``config`` over the workers of ``client`` (a ``distributed.Client``), one shard each.

    Returns the merged statistics (``lost_shards`` names any worker lost mid-run); raises
    :class:`SwarmError` when there is no worker, or a shard fails by a defect of its own.
    """
    from distributed import Event, Variable

    workers = cluster_workers(client)
    if not workers:
        raise SwarmError(f"the Dask scheduler {client.scheduler.address} has no workers")
    shards = split(list(config.device_ids), len(workers))
    run = f"fleet-swarm-{uuid.uuid4().hex[:12]}"
    stop_event = Event(f"{run}-stop", client=client)
    futures: dict[int, Any] = {}
    progress = {i: Variable(progress_name(run, i), client=client) for i in range(len(shards))}
    for index in range(len(shards)):  # set before any get: an unset Variable's get is an error
        progress[index].set(None)
        Variable(claim_name(run, index), client=client).set("")
    for index, ids in enumerate(shards):
        shard = replace(
            config, device_ids=ids, ramp_per_second=config.ramp_per_second / len(shards)
        )
        futures[index] = client.submit(
            run_shard,
            shard,
            ShardIdentities.read(config.workspace, ids),
            run,
            index,
            workers=[workers[index]],
            allow_other_workers=False,
            pure=False,
            key=f"{run}-shard-{index}",
        )
    tracker = _ShardTracker(futures, progress, workers, [len(ids) for ids in shards])
    give_up = time.monotonic() + config.duration + _ANSWER_GRACE
    next_watch = 0.0
    with stop_on_signals() as interrupted:
        if on_start is not None:
            on_start()
        while tracker.pending:
            if interrupted.requested and not stop_event.is_set():
                stop_event.set()
                give_up = time.monotonic() + _ANSWER_GRACE
            time.sleep(PROGRESS_EVERY)
            tracker.read_progress()
            if on_progress is not None and tracker.latest:
                on_progress(SwarmStats.merge(list(tracker.latest.values())))
            tracker.collect_finished()
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + _WATCH_EVERY
                tracker.lose_missing(
                    set(cluster_workers(client)), overdue=time.monotonic() > give_up
                )
        stop_event.set()  # every shard has answered or is lost: nothing may run on
    for index in range(len(shards)):  # nothing of the run stays at the scheduler
        progress[index].delete()
        Variable(claim_name(run, index), client=client).delete()
    if tracker.errors:
        raise SwarmError("; ".join(tracker.errors))
    snapshots = tracker.snapshots()
    stats = SwarmStats.merge([snapshots[i] for i in sorted(snapshots)])
    stats.interrupted = interrupted.requested
    return ClusterRun(stats, snapshots, workers[: len(shards)])


class _ShardTracker:
    """What the client knows of each shard: its latest statistics, its final ones once its
    task returned, or why it was lost (its worker left, it restarted elsewhere, no answer)."""

    def __init__(
        self,
        futures: dict[int, Any],
        progress: dict[int, Any],
        workers: list[str],
        sizes: list[int],
    ) -> None:
        self.futures = futures
        self.progress = progress
        self.workers = workers
        self.sizes = sizes
        self.latest: dict[int, dict[str, Any]] = {}
        self.finals: set[int] = set()
        self.lost: dict[int, str] = {}
        self.errors: list[str] = []

    @property
    def running(self) -> list[int]:
        done = self.finals | self.lost.keys()
        return [i for i in self.futures if i not in done]

    @property
    def pending(self) -> bool:
        return not self.errors and bool(self.running)

    def read_progress(self) -> None:
        for index in self.running:
            snapshot = self.progress[index].get()
            if snapshot is not None:
                self.latest[index] = snapshot

    def collect_finished(self) -> None:
        for index in self.running:
            future = self.futures[index]
            if not future.done():
                continue
            if future.status != "finished":
                self.errors.append(
                    f"shard {index} on {self.workers[index]}: {future.exception()!r}"
                )
            elif future.result() is None:
                self.lost[index] = "restarted elsewhere after its worker was lost"
            else:
                self.latest[index] = future.result()
                self.finals.add(index)

    def lose_missing(self, alive: set[str], *, overdue: bool) -> None:
        for index in self.running:
            if self.workers[index] not in alive:
                self.lost[index] = "worker lost mid-run"
            elif overdue:
                self.lost[index] = "no answer in time"
            else:
                continue
            self.futures[index].cancel()

    def snapshots(self) -> dict[int, dict[str, Any]]:
        """Every shard's last word; a lost one's carries ``lost_shards`` with its worker."""
        result = dict(self.latest)
        for index, why in self.lost.items():
            snapshot = result.get(index) or SwarmStats(devices=self.sizes[index]).to_wire()
            lost = {"worker": self.workers[index], "devices": self.sizes[index], "why": why}
            result[index] = snapshot | {"lost_shards": [lost]}
        return result

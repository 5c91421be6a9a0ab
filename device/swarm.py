"""The swarm engine: thousands of devices per process, sharded over processes.

A :class:`Swarm` runs one shard on the current event loop: it creates devices lazily at the
configured ramp rate (an identity costs nothing until its turn comes), caps handshakes in
flight, keeps every device publishing, stops at the deadline and reports
:class:`~device.stats.SwarmStats`. :func:`run_swarm` shards a fleet over processes and merges
their statistics; the CLI is a thin layer over it, and other runners can drive shards directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import queue
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from device.device import Device, load_credentials
from device.paho_driver import PahoDriver
from device.settings import DeviceBehaviour, DeviceSettings
from device.stats import SwarmStats
from fleet.kernel.errors import CertificateError, FleetError
from fleet.kernel.signals import stop_on_signals
from fleet.kernel.tls import DeviceTls
from fleet.store.workspace import WorkspacePaths

ProgressCallback = Callable[[SwarmStats], None]


@dataclass(frozen=True, slots=True)
class SwarmConfig(DeviceBehaviour):
    """One shard's work. Paths follow the fleet workspace layout (``devices/<id>/...``)."""

    workspace: Path
    device_ids: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8883
    server_name: str | None = "localhost"
    ramp_per_second: float = 300.0
    max_in_flight: int = 100
    duration: float = 60.0
    source_ips: tuple[str, ...] = ()
    renew_at: float | None = None  # renew over MQTT at this fraction of each lifetime
    pins: tuple[str, ...] = ()  # sha256/BASE64 pins of the broker's key (none: no pinning)
    groups: tuple[str, ...] = ()  # key-exchange groups the devices offer (none: P-256)


class Swarm:
    """One shard of devices on the running event loop."""

    def __init__(self, config: SwarmConfig) -> None:
        self.config = config
        self.stats = SwarmStats(devices=len(config.device_ids))
        self.devices: list[Device] = []
        self._started = 0.0

    def _settings(self, index: int, device_id: str) -> DeviceSettings:
        c = self.config
        paths = WorkspacePaths(c.workspace)
        return DeviceSettings(
            device_id=device_id,
            cert=paths.device_cert(device_id),
            key=paths.device_key(device_id),
            trust_anchor=paths.root_cert,
            host=c.host,
            port=c.port,
            server_name=c.server_name,
            source_ip=c.source_ips[index % len(c.source_ips)] if c.source_ips else None,
            renew_at=c.renew_at,
            pins=c.pins,
            groups=c.groups,
            **c.behaviour(),
        )

    def snapshot(self) -> SwarmStats:
        stats = self.stats
        stats.connected_now = sum(1 for d in self.devices if d.connected)
        stats.sent = sum(d.stats.sent for d in self.devices)
        stats.acknowledged = sum(d.stats.acknowledged for d in self.devices)
        stats.disconnects = sum(len(d.stats.disconnects) for d in self.devices)
        stats.renewals = sum(d.stats.renewals for d in self.devices)
        stats.renewal_failures = Counter()
        for device in self.devices:
            if device.stats.renewal_failures:  # rare: no Counter arithmetic per device
                stats.renewal_failures.update(device.stats.renewal_failures)
        stats.elapsed = time.perf_counter() - self._started if self._started else 0.0
        return stats

    async def run(
        self,
        stop: asyncio.Event | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        progress_every: float = 0.25,
    ) -> SwarmStats:
        """Ramp up, run until the deadline or ``stop``, drain acknowledgements, report."""
        stop = stop or asyncio.Event()
        c = self.config
        driver = PahoDriver()
        gate = asyncio.Semaphore(c.max_in_flight)
        self._started = time.perf_counter()
        deadline = asyncio.get_running_loop().call_later(c.duration, stop.set)
        reporter = asyncio.create_task(self._report(stop, on_progress, progress_every))
        tasks: list[asyncio.Task[None]] = []
        try:
            for index, device_id in enumerate(c.device_ids):
                due = self._started + index / c.ramp_per_second
                delay = due - time.perf_counter()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
                settings = self._settings(index, device_id)
                device = Device(
                    settings,
                    driver,
                    context=await _prepare_context(settings),
                    connect_gate=gate,
                    on_attempt=self.stats.record,
                )
                self.devices.append(device)
                tasks.append(asyncio.create_task(device.run(stop)))
            await self._wait_ramp_done(stop)
            await stop.wait()
            self.stats.connected_at_deadline = sum(1 for d in self.devices if d.connected)
        finally:
            stop.set()
            deadline.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        return self.snapshot()

    async def _wait_ramp_done(self, stop: asyncio.Event) -> None:
        """Note when every device has had its first attempt (the achieved ramp)."""
        while not stop.is_set():
            if all(d.stats.attempts for d in self.devices) and len(self.devices) == len(
                self.config.device_ids
            ):
                self.stats.ramp_seconds = time.perf_counter() - self._started
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    async def _report(
        self, stop: asyncio.Event, on_progress: ProgressCallback | None, every: float
    ) -> None:
        while on_progress is not None:
            on_progress(self.snapshot())
            await asyncio.sleep(every)


async def _prepare_context(settings: DeviceSettings) -> DeviceTls | None:
    """Load a device's certificate and key off the event loop (file reads and parsing).
    ``None`` when unusable: the device then reports why when it connects."""
    try:
        return await asyncio.to_thread(load_credentials, settings)
    except CertificateError:
        return None


# -- several processes ------------------------------------------------------------------------


def split(device_ids: list[str], shards: int) -> list[tuple[str, ...]]:
    """Deal ``device_ids`` round-robin into ``shards`` groups (empty groups dropped)."""
    return [group for group in (tuple(device_ids[k::shards]) for k in range(shards)) if group]


def event_loop_runner() -> Callable[[Any], Any]:
    """What runs a shard's event loop: uvloop where installed, else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def tune_for_many_devices() -> None:
    """A shard's process: thousands of devices are millions of objects, and full garbage
    collections would stall the loop; collect rarely, and never what exists already."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _shard_main(config: SwarmConfig, messages: Any, stop_flag: Any, index: int) -> None:
    """Entry point of a shard process: run, stream snapshots, send the final one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    tune_for_many_devices()

    async def main() -> None:
        stop = asyncio.Event()

        async def watch_parent() -> None:
            while not stop_flag.is_set():
                await asyncio.sleep(0.1)
            stop.set()

        watcher = asyncio.create_task(watch_parent())
        swarm = Swarm(config)
        final = await swarm.run(
            stop, on_progress=lambda s: messages.put((index, "progress", s.to_wire()))
        )
        watcher.cancel()
        messages.put((index, "final", final.to_wire()))

    try:
        event_loop_runner()(main())
    except Exception as exc:  # reported to the parent, which prints it; never a silent death
        messages.put((index, "error", f"{type(exc).__name__}: {exc}"))


def run_swarm(
    config: SwarmConfig,
    *,
    processes: int | None = None,
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[], None] | None = None,
) -> SwarmStats:
    """Run ``config.device_ids`` over ``processes`` shard processes (default: one per core).

    ``on_start`` is called once every shard is started and Ctrl-C is handled.

    Ctrl-C (or SIGTERM) asks every shard to stop: each drains its acknowledgements, disconnects
    and reports, and the merged summary of what happened is returned with ``interrupted`` set.
    """
    count = max(1, min(processes or os.cpu_count() or 1, len(config.device_ids)))
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    stop_flag = context.Event()
    shards = split(list(config.device_ids), count)
    latest: dict[int, dict[str, Any]] = {}
    finished: set[int] = set()
    errors: list[str] = []
    workers = []
    with stop_on_signals(on_stop=stop_flag.set) as interrupted:
        for index, ids in enumerate(shards):
            shard = replace(
                config, device_ids=ids, ramp_per_second=config.ramp_per_second / len(shards)
            )
            worker = context.Process(
                target=_shard_main, args=(shard, messages, stop_flag, index), daemon=True
            )
            worker.start()
            workers.append(worker)
        if on_start is not None:
            on_start()
        while len(finished) < len(workers):
            try:
                index, kind, payload = messages.get(timeout=0.5)
            except queue.Empty:
                for i, worker in enumerate(workers):
                    if not worker.is_alive() and i not in finished:
                        errors.append(f"shard {i} exited with code {worker.exitcode}")
                        finished.add(i)
                continue
            if kind == "error":
                errors.append(f"shard {index}: {payload}")
                finished.add(index)
                continue
            latest[index] = payload
            if kind == "final":
                finished.add(index)
            if on_progress is not None:
                on_progress(SwarmStats.merge(list(latest.values())))
        stop_flag.set()
        for worker in workers:
            worker.join(10)
    if errors:
        raise SwarmError("; ".join(errors))
    stats = SwarmStats.merge(list(latest.values()))
    stats.interrupted = interrupted.requested
    return stats


class SwarmError(FleetError):
    """A shard process failed; the message says which and why."""

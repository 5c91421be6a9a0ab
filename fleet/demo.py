"""The story ``make demo`` tells: a fleet on the embedded broker, one device revoked live.

Provision devices, start the broker, connect every device (each with its own certificate),
keep them publishing, revoke one, watch it drop and be refused while the others continue.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from broker import BrokerSettings, FleetBroker
from device import Device, DeviceSettings, PahoDriver
from fleet.config import FleetConfig
from fleet.provisioning import ProvisionSpec, provision_devices
from fleet.revocation import revoke_device
from fleet.workspace import Workspace, init_workspace


@dataclass(frozen=True, slots=True)
class DemoResult:
    devices: int
    connected_before: int
    revoked: str
    cut_off_seconds: float
    still_connected: int
    sent: int
    acknowledged: int
    broker_outcomes: dict[str, int]
    victim_attempts: list[str]


def run_demo(directory: Path, *, devices: int = 200, console: Console | None = None) -> DemoResult:
    console = console or Console()
    init_workspace(directory, config=FleetConfig())
    workspace = Workspace.open(directory)
    result = provision_devices(workspace, ProvisionSpec(count=devices, prefix="sensor"))
    console.print(
        f"provisioned {devices} devices, each with its own key and certificate, in {result.elapsed_s:.2f} s"
    )
    return asyncio.run(_run(workspace, result.device_ids, console))


async def _run(workspace: Workspace, device_ids: list[str], console: Console) -> DemoResult:
    settings = BrokerSettings(
        workspace=workspace.paths.root, port=0, metrics_port=None, event_log=False
    )
    async with FleetBroker(settings) as broker:
        console.print(f"embedded broker listening on {broker.url} (client certificates required)")
        driver = PahoDriver()
        paths = workspace.paths
        fleet = [
            Device(
                DeviceSettings(
                    device_id,
                    paths.device_cert(device_id),
                    paths.device_key(device_id),
                    paths.root_cert,
                    port=broker.port or 0,
                    publish_every=1.0,
                    backoff_cap=2.0,
                ),
                driver,
            )
            for device_id in device_ids
        ]
        stop = asyncio.Event()
        started = time.perf_counter()
        tasks = []
        for device in fleet:
            tasks.append(asyncio.create_task(device.run(stop)))
            await asyncio.sleep(0.005)  # ramp at about 200 connections per second
        await _until(lambda: len(broker.connected_devices) == len(fleet), timeout=30)
        connected_before = len(broker.connected_devices)
        console.print(
            f"{connected_before} devices connected in {time.perf_counter() - started:.1f} s; publishing every second"
        )
        await asyncio.sleep(2)

        victim = fleet[min(41, len(fleet) - 1)]
        console.print(f"revoking [bold]{victim.device_id}[/] while it is connected ...")
        revoked_at = time.perf_counter()
        await asyncio.to_thread(revoke_device, workspace, victim.device_id)
        await asyncio.wait_for(victim.wait_disconnected(), 10)
        cut_off = time.perf_counter() - revoked_at
        console.print(
            f"{victim.device_id} was cut off {cut_off * 1000:.0f} ms after 'fleet revoke'; the others keep publishing"
        )
        await asyncio.sleep(3)
        still_connected = len(broker.connected_devices)
        stop.set()
        await asyncio.gather(*tasks)
        registry = broker.metrics.registry
        outcomes = {
            outcome: int(
                registry.get_sample_value("mtls_connection_attempts_total", {"outcome": outcome})
                or 0
            )
            for outcome in ("ok", "revoked")
        }
        others = [d for d in fleet if d is not victim]
        return DemoResult(
            devices=len(fleet),
            connected_before=connected_before,
            revoked=victim.device_id,
            cut_off_seconds=cut_off,
            still_connected=still_connected,
            sent=sum(d.stats.sent for d in others),
            acknowledged=sum(d.stats.acknowledged for d in others),
            broker_outcomes=outcomes,
            victim_attempts=[
                f"{a.outcome.value}" + (f" ({a.detail})" if a.detail else "")
                for a in victim.stats.attempts
            ],
        )


async def _until(condition: object, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    assert callable(condition)
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def print_summary(result: DemoResult, console: Console) -> None:
    table = Table(title="demo summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("devices", str(result.devices))
    table.add_row("connected before the revocation", str(result.connected_before))
    table.add_row("revoked live", result.revoked)
    table.add_row("cut off after", f"{result.cut_off_seconds * 1000:.0f} ms")
    table.add_row(
        "still connected 3 s later", f"{result.still_connected} (expected {result.devices - 1})"
    )
    lost = result.sent - result.acknowledged
    table.add_row(
        "QoS 1 messages of the others",
        f"{result.sent} sent, {result.acknowledged} acknowledged, {lost} unacknowledged",
    )
    table.add_row("broker: accepted connections", str(result.broker_outcomes["ok"]))
    table.add_row("broker: refused as revoked", str(result.broker_outcomes["revoked"]))
    attempts = Counter(result.victim_attempts)
    table.add_row(
        f"{result.revoked}'s attempts", ", ".join(f"{n}x {a}" for a, n in attempts.items())
    )
    console.print(table)

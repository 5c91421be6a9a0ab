"""The witness: what "delivered" means in a scenario.

A broker acknowledges a QoS 1 PUBLISH it then refuses to route (MQTT 3.1.1 has no negative
PUBACK), so acknowledgements prove nothing about delivery. The witness is one more client, with
a silver certificate of its own, subscribed to every device's telemetry
(``devices/+/telemetry``) on whatever broker the scenario runs against; a device's message is
*delivered* when the witness received it. It reconnects and resubscribes by itself (broker
restarts), and is re-issued when the issuing CA rotates.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter

from device import Device, DeviceSettings
from fleet.scenario.population import Endpoint, Population
from fleet.store.provisioning import ProvisionSpec, provision_devices
from fleet.store.renewal import renew_device
from fleet.store.workspace import Workspace

TELEMETRY = "devices/+/telemetry"
_NEVER = 10**9  # seconds between the witness's own telemetry: it publishes nothing


class Witness:
    """Counts, per device id, the telemetry messages a subscriber received."""

    def __init__(self, workspace: Workspace, population: Population, env: str | None) -> None:
        self.workspace = workspace
        self.population = population
        self.env = env or "prod"
        self.device_id: str | None = None
        self._device: Device | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._past: Counter[str] = Counter()  # what earlier connections of the witness received

    async def start(self, endpoint: Endpoint) -> None:
        if self.device_id is None:
            spec = ProvisionSpec(count=1, prefix="witness", tier="silver", env=self.env,
                                 valid_for=dt.timedelta(days=1))  # fmt: skip
            result = await asyncio.to_thread(provision_devices, self.workspace, spec, workers=1)
            self.device_id = result.device_ids[0]
        paths = self.workspace.paths
        settings = DeviceSettings(
            self.device_id,
            paths.device_cert(self.device_id),
            paths.device_key(self.device_id),
            endpoint.trust_anchor,
            host=endpoint.host,
            port=endpoint.port,
            server_name=endpoint.server_name,
            publish_every=_NEVER,
            subscribe_commands=False,
            also_subscribe=(TELEMETRY,),
            backoff_base=0.1,
            backoff_cap=1.0,
        )
        driver, gate = self.population.connection_resources()
        self._device = Device(settings, driver, connect_gate=gate)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._device.run(self._stop))

    async def reissue(self, endpoint: Endpoint) -> None:
        """After a CA rotation: a certificate from the new issuer, and a new connection."""
        await self.stop()
        assert self.device_id is not None
        await asyncio.to_thread(renew_device, self.workspace, self.device_id)
        await self.start(endpoint)

    async def stop(self) -> None:
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await self._task
            assert self._device is not None
            self._past.update(self._device.stats.received_topics)
        self._device = self._stop = self._task = None

    def delivered(self, device_id: str) -> int:
        """Telemetry messages of ``device_id`` the witness has received so far."""
        topic = f"devices/{device_id}/telemetry"
        now = self._device.stats.received_topics[topic] if self._device is not None else 0
        return self._past[topic] + now

"""paho-mqtt on an asyncio loop without a thread per device.

paho exposes socket callbacks for exactly this: the loop watches each device's socket and
calls paho when it is readable or writable (see :class:`device.device.Device`); one timer per
loop (:class:`PahoDriver`) runs paho's keepalive work for every device of that loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import paho.mqtt.client as mqtt

from device.connect import TlsConnection


class PreparedSocketClient(mqtt.Client):
    """A paho client that uses a socket we connected and handshook without blocking."""

    prepared: TlsConnection | None = None

    def _create_socket(self) -> Any:
        sock, self.prepared = self.prepared, None
        if sock is None:
            raise ConnectionError("no prepared TLS socket")
        return sock


class PahoDriver:
    """Runs paho's periodic work (keepalive, retries) for every device of one loop."""

    def __init__(self) -> None:
        self._clients: set[mqtt.Client] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, client: mqtt.Client) -> None:
        self._clients.add(client)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(1.0, self._tick)

    def discard(self, client: mqtt.Client) -> None:
        self._clients.discard(client)

    def _tick(self) -> None:
        for client in list(self._clients):
            client.loop_misc()
        self._handle = (
            asyncio.get_running_loop().call_later(1.0, self._tick) if self._clients else None
        )

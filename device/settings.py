"""What one simulated device is told (:class:`DeviceSettings`) and what it counts
(:class:`DeviceStats`).

How a device behaves once connected, and how it retries, is declared once
(:class:`DeviceBehaviour`): a device's settings, a swarm's configuration and a scenario's
``devices:`` defaults all are one (with their own defaults where they differ).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from device.outcomes import ConnectAttempt


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceBehaviour:
    """How a device talks once connected, and how it retries (keyword arguments only)."""

    qos: int = 1
    publish_every: float = 10.0  # seconds between telemetry messages
    payload_size: int = 64  # bytes of each telemetry message, padded
    keepalive: int = 60
    mqtt_version: int = 4  # 4: MQTT 3.1.1, 5: MQTT 5
    connect_timeout: float = 10.0  # TCP, TLS and CONNACK, each attempt
    backoff_base: float = 0.5  # exponential backoff with full jitter between attempts
    backoff_cap: float = 30.0

    def behaviour(self) -> dict[str, Any]:
        """These fields alone, as keyword arguments (``DeviceSettings(..., **b.behaviour())``)."""
        return {f.name: getattr(self, f.name) for f in fields(DeviceBehaviour)}


@dataclass(frozen=True, slots=True)
class DeviceSettings(DeviceBehaviour):
    """Who one simulated device is, where it connects, and how it behaves."""

    device_id: str
    cert: Path
    key: Path
    trust_anchor: Path
    host: str = "127.0.0.1"
    port: int = 8883
    server_name: str | None = "localhost"
    source_ip: str | None = None
    client_id: str | None = None  # default: the device id (a different one tests spoofing)
    reconnect: bool = True  # False: one session at most, no retry after a refusal or a drop
    subscribe_commands: bool = True  # to devices/<id>/commands at every connect
    also_subscribe: tuple[str, ...] = ()  # more topic filters subscribed at every connect (QoS 1)
    renew_at: float | None = None  # renew over MQTT at this fraction of the lifetime (e.g. 2/3)
    request_timeout: float = 10.0  # wait this long for the control plane's reply
    # "sha256/BASE64" pins of the broker's public key (its SubjectPublicKeyInfo, as HPKP and
    # curl --pinnedpubkey spell them): when given, a valid chain must also carry one of them
    pins: tuple[str, ...] = ()
    present_certificate: bool = True  # False: show the broker no client certificate at all
    # key-exchange groups offered, in order (fleet.kernel.tls.parse_groups); empty: P-256 only
    groups: tuple[str, ...] = ()


@dataclass
class DeviceStats:
    attempts: list[ConnectAttempt] = field(default_factory=list)
    sent: int = 0
    acknowledged: int = 0
    received: int = 0
    received_topics: Counter[str] = field(default_factory=Counter)
    disconnects: list[str] = field(default_factory=list)
    planned_reconnects: int = 0
    renewals: int = 0
    renewal_failures: Counter[str] = field(default_factory=Counter)

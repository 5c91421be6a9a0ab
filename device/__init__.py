"""mtls-fleet devices: simulated certificate-holding devices built on paho-mqtt and asyncio."""

from device.connect import TlsSocket, open_tls_socket
from device.device import Device, DeviceSettings, DeviceStats, PahoDriver
from device.outcomes import ConnectAttempt, ConnectOutcome, classify_tls_failure
from device.tls import device_tls_context

__all__ = [
    "ConnectAttempt",
    "ConnectOutcome",
    "Device",
    "DeviceSettings",
    "DeviceStats",
    "PahoDriver",
    "TlsSocket",
    "classify_tls_failure",
    "device_tls_context",
    "open_tls_socket",
]

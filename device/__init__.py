"""mtls-fleet devices: simulated certificate-holding devices built on paho-mqtt and asyncio."""

from device.connect import TlsSocket, open_tls_socket
from device.device import Device, DeviceSettings, DeviceStats, PahoDriver
from device.enrollment import ClaimBundle, EnrollmentResult, enroll
from device.outcomes import ConnectAttempt, ConnectOutcome, classify_tls_failure
from device.tls import device_tls_context

__all__ = [
    "ClaimBundle",
    "ConnectAttempt",
    "ConnectOutcome",
    "Device",
    "DeviceSettings",
    "DeviceStats",
    "EnrollmentResult",
    "PahoDriver",
    "TlsSocket",
    "classify_tls_failure",
    "device_tls_context",
    "enroll",
    "open_tls_socket",
]

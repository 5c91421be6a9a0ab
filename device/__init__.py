"""mtls-fleet devices: simulated certificate-holding devices built on paho-mqtt and asyncio."""

from device.connect import (
    DeviceConnection,
    TlsConnection,
    TlsSocket,
    open_device_tls,
    open_tls_socket,
)
from device.device import Device
from device.enrollment import ClaimBundle, EnrollmentResult, enroll
from device.outcomes import (
    DROPPED,
    REASONS_BY_OUTCOME,
    ConnectAttempt,
    ConnectOutcome,
    DropReason,
    UntrustedReason,
    classify_tls_failure,
)
from device.paho_driver import PahoDriver
from device.settings import DeviceBehaviour, DeviceSettings, DeviceStats
from fleet.kernel.tls import DeviceTls, device_tls, device_tls_context, spki_pin

__all__ = [
    "DROPPED",
    "REASONS_BY_OUTCOME",
    "ClaimBundle",
    "ConnectAttempt",
    "ConnectOutcome",
    "Device",
    "DeviceBehaviour",
    "DeviceConnection",
    "DeviceSettings",
    "DeviceStats",
    "DeviceTls",
    "DropReason",
    "EnrollmentResult",
    "PahoDriver",
    "TlsConnection",
    "TlsSocket",
    "UntrustedReason",
    "classify_tls_failure",
    "device_tls",
    "device_tls_context",
    "enroll",
    "open_device_tls",
    "open_tls_socket",
    "spki_pin",
]

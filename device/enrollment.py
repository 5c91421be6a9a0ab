"""A new device enrolls through a claim: connect with the claim, ask, keep its own key.

The device connects with the claim certificate as ``enroll:<request-id>``, generates its own
key, publishes the CSR with a proof that it holds the claim, and waits for the control plane's
answer. The key never leaves the device: on success ``STORE/<id>/key.pem`` (0600) and
``cert.pem`` are written, the same layout as a workspace's devices, so a swarm can use them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from device.device import Device
from device.outcomes import TLS_ALERTS, ConnectOutcome
from device.paho_driver import PahoDriver
from device.requests import prepare_enrollment
from device.settings import DeviceSettings
from fleet.kernel.errors import CertificateError
from fleet.kernel.identity_files import install_identity
from fleet.kernel.mqtt_api import PROVISION, enroll_client_id
from fleet.kernel.tls import DeviceTls, device_tls


@dataclass(frozen=True, slots=True)
class ClaimBundle:
    """What the factory puts on every device of a batch: ``DIR/claims/<name>/``."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def trust_anchor(self) -> Path:
        return self.directory / "root.crt"

    def context(self) -> DeviceTls:
        """One set of TLS credentials for every enrollment of this claim."""
        return device_tls(self.trust_anchor, self.cert, self.key, device_id=self.directory.name)


# Why an enrollment got no answer (``failed``): the connection's outcome (with the TLS alert of
# a refusal in the handshake), or the control plane's silence.
ENROLLMENT_FAILURES = (
    *(o.value for o in ConnectOutcome),
    *(f"{ConnectOutcome.REJECTED_BY_BROKER.value} {alert}" for alert in TLS_ALERTS),
    "disconnected",
)


@dataclass(frozen=True, slots=True)
class EnrollmentResult:
    """``status``: enrolled, refused (the control plane said no: ``reason``) or failed
    (no answer: connection refused, timeout …, with ``reason`` and ``detail``)."""

    device_id: str
    status: str
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0

    @property
    def enrolled(self) -> bool:
        return self.status == "enrolled"

    @property
    def outcome(self) -> str:
        """``enrolled``, ``refused <reason>``, ``failed <reason>``, or for a refusal in the
        handshake ``failed rejected_by_broker <TLS alert>``: what scenarios compare, exactly."""
        parts = [self.status, self.reason]
        if self.reason == ConnectOutcome.REJECTED_BY_BROKER and self.detail in TLS_ALERTS:
            parts.append(self.detail)
        return " ".join(part for part in parts if part)


async def enroll(
    device_id: str,
    claim: ClaimBundle,
    store: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8883,
    server_name: str | None = "localhost",
    hardware_serial: str = "",
    timeout: float = 10.0,
    driver: PahoDriver | None = None,
    context: DeviceTls | None = None,
    connect_gate: asyncio.Semaphore | None = None,
) -> EnrollmentResult:
    """Enroll ``device_id`` through ``claim``; on success its key and chain are in
    ``store/<device_id>/``. Never raises for a refusal or a network failure: the result says."""
    started = time.perf_counter()

    def result(status: str, reason: str = "", detail: str = "") -> EnrollmentResult:
        return EnrollmentResult(device_id, status, reason, detail, time.perf_counter() - started)

    try:
        prepared = await asyncio.to_thread(
            prepare_enrollment, device_id, claim.cert, claim.key, hardware_serial=hardware_serial
        )
    except CertificateError as exc:
        return result("failed", "credentials_error", exc.reason)
    settings = DeviceSettings(
        device_id=device_id,
        cert=claim.cert,
        key=claim.key,
        trust_anchor=claim.trust_anchor,
        host=host,
        port=port,
        server_name=server_name,
        connect_timeout=timeout,
        client_id=enroll_client_id(prepared.request_id),
        reconnect=False,
        subscribe_commands=False,
        request_timeout=timeout,
    )
    device = Device(settings, driver or PahoDriver(), context=context, connect_gate=connect_gate)
    attempt = await device.connect()
    if attempt.outcome is not ConnectOutcome.CONNECTED:
        return result("failed", attempt.outcome.value, attempt.detail or "")
    try:
        reply = await device.request(
            PROVISION, prepared.request_id, prepared.request_id, prepared.payload
        )
    except TimeoutError:
        return result("failed", "timeout", f"no answer from the control plane within {timeout:g} s")
    except ConnectionError as exc:
        return result("failed", "disconnected", str(exc))
    finally:
        await device.close()
    if not reply.issued:
        return result("refused", reply.reason, reply.message)
    directory = store / device_id
    await asyncio.to_thread(
        install_identity,
        directory / "cert.pem",
        directory / "key.pem",
        reply.certificate.encode(),
        prepared.key_pem,
    )
    return result("enrolled")

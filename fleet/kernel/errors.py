"""The exception hierarchy of mtls-fleet.

Every error the tool raises on purpose derives from :class:`FleetError`; its message is one
line that names the thing at fault and says what to do next. The CLI prints that line and exits
with :attr:`FleetError.exit_code` (1 for a failed operation, 2 for input the user must correct).
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every deliberate mtls-fleet error."""

    exit_code = 1


class UsageError(FleetError):
    """Input the user must correct: a malformed duration, a count that is not positive, ..."""

    exit_code = 2


class WorkspaceError(FleetError):
    """The fleet workspace is missing, incomplete or not writable."""


class RegistryError(FleetError):
    """The device registry refused an operation (unknown id, duplicate id, ...)."""


class UnknownDeviceError(RegistryError):
    """A device id that the registry does not hold."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        super().__init__(
            f"unknown device {device_id!r}: run 'fleet inventory' to list the provisioned devices"
        )


class UnknownClaimError(RegistryError):
    """A claim name that the registry does not hold."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown claim {name!r}: 'fleet claim list' shows the claims")


class NameTakenError(UsageError):
    """A name already in use: a device id, a claim name, an output path.

    ``field`` names the input that chose it (``id``, ``name``, ``out``), so an API can point at it.
    """

    def __init__(self, message: str, *, field: str) -> None:
        self.field = field
        super().__init__(message)


class RequestRefused(FleetError):
    """The control plane refused an enrollment or renewal; ``reason`` is a stable name
    (``id_taken``, ``claim_exhausted`` …) that devices and metrics use."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class CertificateError(FleetError):
    """A certificate, key or CSR is unusable; the message names the device and the reason."""

    def __init__(
        self, reason: str, *, device_id: str | None = None, code: str = "unusable_certificate"
    ) -> None:
        self.device_id = device_id
        self.reason = reason
        self.code = code  # a stable name for reports (missing_file, key_mismatch …)
        subject = f"device {device_id!r}: " if device_id else ""
        super().__init__(f"{subject}{reason}")


class ProvisioningInterrupted(FleetError):
    """A provisioning run stopped half way; everything it had written was rolled back."""

    exit_code = 130

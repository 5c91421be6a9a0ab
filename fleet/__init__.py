"""mtls-fleet's fleet controller: certificate authority, registry, provisioning, revocation.

The public API; the CLI (:mod:`fleet.cli`) is a thin layer over it. The control plane
(:class:`fleet.controlplane.server.ControlPlane`, with its MQTT service and admin API) and the
scenario engine (:mod:`fleet.scenario`) are imported from their modules.
"""

from fleet.kernel.config import FleetConfig
from fleet.kernel.durations import parse_duration, parse_instant, parse_positive_duration
from fleet.kernel.errors import (
    CertificateError,
    FleetError,
    ProvisioningInterrupted,
    RegistryError,
    RequestRefused,
    UnknownDeviceError,
    UsageError,
    WorkspaceError,
)
from fleet.kernel.identity import DeviceIdentity, identity_from_certificate
from fleet.kernel.keys import KeyType, generate_private_key
from fleet.store.bundles import export_pkcs12
from fleet.store.ca import (
    CertificateAuthority,
    RevokedEntry,
    create_intermediate_ca,
    create_root_ca,
)
from fleet.store.claims import ClaimRules, create_claim, revoke_claim
from fleet.store.provisioning import (
    ProvisionResult,
    ProvisionSpec,
    provision_devices,
    provision_from_csr,
)
from fleet.store.records import ClaimRecord, DeviceRecord, Enrollment
from fleet.store.registry import Registry
from fleet.store.revocation import RevocationResult, publish_crl, revoke_device, revoke_devices
from fleet.store.workspace import (
    Workspace,
    WorkspacePaths,
    init_workspace,
    issue_broker_certificate,
)

__all__ = [
    "CertificateAuthority",
    "CertificateError",
    "ClaimRecord",
    "ClaimRules",
    "DeviceIdentity",
    "DeviceRecord",
    "Enrollment",
    "FleetConfig",
    "FleetError",
    "KeyType",
    "ProvisionResult",
    "ProvisionSpec",
    "ProvisioningInterrupted",
    "Registry",
    "RegistryError",
    "RequestRefused",
    "RevocationResult",
    "RevokedEntry",
    "UnknownDeviceError",
    "UsageError",
    "Workspace",
    "WorkspaceError",
    "WorkspacePaths",
    "create_claim",
    "create_intermediate_ca",
    "create_root_ca",
    "export_pkcs12",
    "generate_private_key",
    "identity_from_certificate",
    "init_workspace",
    "issue_broker_certificate",
    "parse_duration",
    "parse_instant",
    "parse_positive_duration",
    "provision_devices",
    "provision_from_csr",
    "publish_crl",
    "revoke_claim",
    "revoke_device",
    "revoke_devices",
]

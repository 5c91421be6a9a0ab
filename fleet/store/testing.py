"""Certificates the fleet would never issue, made on purpose (in the spirit of ``trustme``).

A rogue CA (same names as the fleet's, other keys), an intermediate under the fleet's own root
that expired yesterday, device certificates with any EKU and validity from any of them, copies of
devices' keys, and broker certificates a strict device must refuse (rogue, expired, wrong
name). Nothing here is recorded in the registry: the fleet did not issue it. The scenario engine,
the handshake bench and the tests take their bad certificates from here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleet.kernel.files import PRIVATE_DIR_MODE, replace_atomically, write_public, write_secret
from fleet.kernel.identity import DeviceIdentity
from fleet.kernel.keys import (
    KeyType,
    generate_private_key,
    key_type_of,
    load_private_key,
    private_key_pem,
)
from fleet.store.ca import CertificateAuthority, create_intermediate_ca, create_root_ca
from fleet.store.workspace import DEFAULT_HOSTS, Workspace, issue_broker_certificate

CLIENT_AUTH = (ExtendedKeyUsageOID.CLIENT_AUTH,)


@dataclass(frozen=True, slots=True)
class DeviceFiles:
    device_id: str
    cert: Path
    key: Path


def rogue_authority(workspace: Workspace) -> CertificateAuthority:
    """An unrelated root and intermediate that copy the fleet's names (valid for a year)."""
    now = dt.datetime.now(dt.UTC)
    domain = workspace.config.trust_domain
    key_type = workspace.config.authority_key_type
    root_cert, root_key = create_root_ca(
        common_name=f"{domain} root CA",
        organization=domain,
        key_type=key_type,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=365),
    )
    issuing_cert, issuing_key = create_intermediate_ca(
        parent_cert=root_cert,
        parent_key=root_key,
        common_name=f"{domain} issuing CA 1",
        organization=domain,
        key_type=key_type,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=365),
    )
    return CertificateAuthority(
        root_cert=root_cert, issuing_cert=issuing_cert, issuing_key=issuing_key
    )


def expired_intermediate(workspace: Workspace) -> CertificateAuthority:
    """An intermediate under the fleet's real root whose validity ended yesterday (the
    workspace must hold its root key)."""
    now = dt.datetime.now(dt.UTC)
    root_key = workspace.root_key()
    if root_key is None:
        raise ValueError(f"{workspace.paths.root}: no root key here to sign an intermediate with")
    domain = workspace.config.trust_domain
    issuing_cert, issuing_key = create_intermediate_ca(
        parent_cert=workspace.ca.root_cert,
        parent_key=root_key,
        common_name=f"{domain} issuing CA (retired)",
        organization=domain,
        key_type=workspace.config.authority_key_type,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    return CertificateAuthority(
        root_cert=workspace.ca.root_cert, issuing_cert=issuing_cert, issuing_key=issuing_key
    )


def issue_devices(
    workspace: Workspace,
    ca: CertificateAuthority,
    directory: Path,
    device_ids: Sequence[str],
    *,
    tier: str = "bronze",
    env: str = "prod",
    not_before: dt.datetime,
    not_after: dt.datetime,
    extended_key_usage: Sequence[x509.ObjectIdentifier] = CLIENT_AUTH,
    key_type: KeyType | None = None,
) -> list[DeviceFiles]:
    """A key (mode 0600, ``key_type`` or the workspace's) and a certificate chain from ``ca``
    for each id, in ``directory/<id>/``; the names, SAN and extensions are a real device's."""
    directory.mkdir(parents=True, mode=PRIVATE_DIR_MODE)
    files = []
    for device_id in device_ids:
        key = generate_private_key(key_type or workspace.config.key_type)
        identity = DeviceIdentity(
            device_id=device_id, tier=tier, env=env, trust_domain=workspace.config.trust_domain
        )
        cert = ca.issue_device(
            identity,
            key.public_key(),
            not_before=not_before,
            not_after=not_after,
            extended_key_usage=tuple(extended_key_usage),
        )
        device_dir = directory / device_id
        device_dir.mkdir(mode=PRIVATE_DIR_MODE)
        write_secret(device_dir / "key.pem", private_key_pem(key))
        write_public(device_dir / "cert.pem", ca.chain_pem(cert))
        files.append(DeviceFiles(device_id, device_dir / "cert.pem", device_dir / "key.pem"))
    return files


def copy_identities(directory: Path, originals: Sequence[DeviceFiles]) -> list[DeviceFiles]:
    """Copies of other devices' keys and certificates (a thief's copy keeps what it took)."""
    directory.mkdir(parents=True, mode=PRIVATE_DIR_MODE)
    copies = []
    for original in originals:
        device_dir = directory / original.device_id
        device_dir.mkdir(mode=PRIVATE_DIR_MODE)
        write_secret(device_dir / "key.pem", original.key.read_bytes())
        write_public(device_dir / "cert.pem", original.cert.read_bytes())
        copies.append(
            DeviceFiles(original.device_id, device_dir / "cert.pem", device_dir / "key.pem")
        )
    return copies


def install_broker_certificate(
    workspace: Workspace,
    *,
    ca: CertificateAuthority | None = None,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    same_key: bool = False,
) -> None:
    """Replace ``broker/server.crt`` and ``.key`` (a broker uses them from its next start):
    from ``ca`` (default: the fleet's), for ``hosts``, valid from ``not_before`` to
    ``not_after`` (default: yesterday to 30 days ahead); ``same_key`` keeps the broker's key
    (a proper re-issue from the fleet CA, which a pin still accepts)."""
    paths = workspace.paths
    if same_key:
        key = load_private_key(paths.server_key.read_bytes(), source=str(paths.server_key))
        issue_broker_certificate(paths, workspace.ca, key=key)
        return
    now = dt.datetime.now(dt.UTC)
    authority = ca or workspace.ca
    key = generate_private_key(
        workspace.config.broker_key_type or key_type_of(workspace.ca.issuing_key)
    )
    cert = authority.issue_server(
        common_name="mtls-fleet broker",
        hosts=hosts,
        public_key=key.public_key(),
        not_before=not_before or now - dt.timedelta(days=1),
        not_after=not_after or now + dt.timedelta(days=30),
    )
    replace_atomically(paths.server_key, private_key_pem(key), mode=0o600)
    replace_atomically(paths.server_cert, authority.chain_pem(cert))

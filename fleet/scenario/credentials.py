"""Certificates the fleet would never issue, made on purpose for scenarios.

A rogue CA (same names as the fleet's, different keys), an expired intermediate under the
fleet's own root, device certificates with the wrong EKU, and broker certificates that a
strict device must refuse. They live under ``DIR/scenario/`` and are never recorded in the
registry: the fleet did not issue them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleet.kernel.files import PRIVATE_DIR_MODE, replace_atomically, write_public, write_secret
from fleet.kernel.identity import DeviceIdentity
from fleet.kernel.keys import generate_private_key, load_private_key, private_key_pem
from fleet.kernel.tls import spki_pin
from fleet.scenario.model import BrokerCertificate, Eku, Group, Issuer
from fleet.store.ca import CertificateAuthority, create_intermediate_ca, create_root_ca
from fleet.store.workspace import DEFAULT_HOSTS, Workspace, issue_broker_certificate

_EKU = {
    Eku.CLIENT_AUTH: (ExtendedKeyUsageOID.CLIENT_AUTH,),
    Eku.SERVER_AUTH: (ExtendedKeyUsageOID.SERVER_AUTH,),
    Eku.NONE: (),
}


@dataclass(frozen=True, slots=True)
class DeviceFiles:
    device_id: str
    cert: Path
    key: Path


class ScenarioCredentials:
    """Makes and remembers the off-fleet authorities of one scenario run."""

    def __init__(self, workspace: Workspace, root: Path) -> None:
        self.workspace = workspace
        self.root = root  # where this run's off-fleet keys and certificates go

    @cached_property
    def rogue_ca(self) -> CertificateAuthority:
        """An unrelated root and intermediate that copy the fleet's names."""
        now = dt.datetime.now(dt.UTC)
        domain = self.workspace.config.trust_domain
        key_type = self.workspace.config.key_type
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

    @cached_property
    def expired_intermediate(self) -> CertificateAuthority:
        """An intermediate under the fleet's real root whose validity ended yesterday."""
        now = dt.datetime.now(dt.UTC)
        ca = self.workspace.ca
        root_key = self.workspace.root_key()
        assert root_key is not None, "a scenario's workspace holds its root key"
        domain = self.workspace.config.trust_domain
        issuing_cert, issuing_key = create_intermediate_ca(
            parent_cert=ca.root_cert,
            parent_key=root_key,
            common_name=f"{domain} issuing CA (retired)",
            organization=domain,
            key_type=self.workspace.config.key_type,
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        )
        return CertificateAuthority(
            root_cert=ca.root_cert, issuing_cert=issuing_cert, issuing_key=issuing_key
        )

    def authority(self, issuer: Issuer) -> CertificateAuthority:
        if issuer is Issuer.ROGUE_CA:
            return self.rogue_ca
        if issuer is Issuer.EXPIRED_INTERMEDIATE:
            return self.expired_intermediate
        return self.workspace.ca

    def issue_group(
        self, group: Group, *, now: dt.datetime, device_ids: Sequence[str] | None = None
    ) -> list[DeviceFiles]:
        """Key and certificate files for every member of an off-fleet group, named
        ``<group>-00001`` … or, for impostors, ``device_ids`` (real devices' names)."""
        ca = self.authority(group.issuer)
        not_before = (now + dt.timedelta(seconds=group.starts_in)).replace(microsecond=0)
        not_after = not_before + dt.timedelta(seconds=group.valid_for)
        directory = self.root / group.name
        directory.mkdir(parents=True, mode=PRIVATE_DIR_MODE)
        files = []
        names = device_ids or [f"{group.name}-{n:05d}" for n in range(1, group.count + 1)]
        for device_id in names:
            key = generate_private_key(self.workspace.config.key_type)
            identity = DeviceIdentity(
                device_id=device_id,
                tier=group.tier,
                env=group.env,
                trust_domain=self.workspace.config.trust_domain,
            )
            cert = ca.issue_device(
                identity,
                key.public_key(),
                not_before=not_before,
                not_after=not_after,
                extended_key_usage=_EKU[group.eku],
            )
            device_dir = directory / device_id
            device_dir.mkdir(mode=PRIVATE_DIR_MODE)
            write_secret(device_dir / "key.pem", private_key_pem(key))
            write_public(device_dir / "cert.pem", ca.chain_pem(cert))
            files.append(DeviceFiles(device_id, device_dir / "cert.pem", device_dir / "key.pem"))
        return files

    def copy_identities(self, group: str, originals: Sequence[DeviceFiles]) -> list[DeviceFiles]:
        """Copies of other devices' keys and certificates (a clone keeps what it copied)."""
        directory = self.root / group
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

    def install_broker_certificate(self, kind: BrokerCertificate) -> None:
        """Replace ``broker/server.crt`` and ``.key`` (the broker uses them from its next start)."""
        paths = self.workspace.paths
        if kind is BrokerCertificate.FLEET:
            issue_broker_certificate(paths, self.workspace.ca)
            return
        if kind is BrokerCertificate.SAME_KEY:
            key = load_private_key(paths.server_key.read_bytes(), source=str(paths.server_key))
            issue_broker_certificate(paths, self.workspace.ca, key=key)
            return
        now = dt.datetime.now(dt.UTC)
        hosts: Sequence[str] = DEFAULT_HOSTS
        ca = self.workspace.ca
        not_before, not_after = now - dt.timedelta(days=1), now + dt.timedelta(days=30)
        if kind is BrokerCertificate.ROGUE_CA:
            ca = self.rogue_ca
        elif kind is BrokerCertificate.WRONG_HOSTNAME:
            hosts = ("broker.elsewhere.invalid",)
        elif kind is BrokerCertificate.EXPIRED:
            not_before, not_after = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
        key = generate_private_key(self.workspace.config.key_type)
        cert = ca.issue_server(
            common_name="mtls-fleet broker",
            hosts=hosts,
            public_key=key.public_key(),
            not_before=not_before,
            not_after=not_after,
        )
        replace_atomically(paths.server_key, private_key_pem(key), mode=0o600)
        replace_atomically(paths.server_cert, ca.chain_pem(cert))


def broker_pin(server_cert: Path) -> str:
    """The ``sha256/…`` pin of the key in a broker certificate file (its first certificate)."""
    cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    return spki_pin(cert.public_bytes(serialization.Encoding.DER))

"""The off-fleet certificates of one scenario run, as its groups and steps name them.

A group's ``issuer`` (rogue CA, expired intermediate) and ``eku`` pick what
:mod:`fleet.store.testing` makes; a ``broker_certificate`` step picks the broker's. They live
under ``DIR/scenario/`` and are never recorded in the registry: the fleet did not issue them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleet.kernel.keys import KeyType
from fleet.kernel.tls import spki_pin
from fleet.scenario.model import BrokerCertificate, Eku, Group, Issuer
from fleet.store.ca import CertificateAuthority
from fleet.store.testing import (
    DeviceFiles,
    copy_identities,
    expired_intermediate,
    install_broker_certificate,
    issue_devices,
    rogue_authority,
)
from fleet.store.workspace import Workspace, issue_broker_certificate

_EKU = {
    Eku.CLIENT_AUTH: (ExtendedKeyUsageOID.CLIENT_AUTH,),
    Eku.SERVER_AUTH: (ExtendedKeyUsageOID.SERVER_AUTH,),
    Eku.NONE: (),
}

__all__ = ["DeviceFiles", "ScenarioCredentials", "broker_pin"]


class ScenarioCredentials:
    """Makes and remembers the off-fleet authorities of one scenario run."""

    def __init__(self, workspace: Workspace, root: Path) -> None:
        self.workspace = workspace
        self.root = root  # where this run's off-fleet keys and certificates go

    @cached_property
    def rogue_ca(self) -> CertificateAuthority:
        """An unrelated root and intermediate that copy the fleet's names."""
        return rogue_authority(self.workspace)

    @cached_property
    def expired_intermediate(self) -> CertificateAuthority:
        """An intermediate under the fleet's real root whose validity ended yesterday."""
        return expired_intermediate(self.workspace)

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
        not_before = (now + dt.timedelta(seconds=group.starts_in)).replace(microsecond=0)
        return issue_devices(
            self.workspace,
            self.authority(group.issuer),
            self.root / group.name,
            device_ids or [f"{group.name}-{n:05d}" for n in range(1, group.count + 1)],
            tier=group.tier,
            env=group.env,
            not_before=not_before,
            not_after=not_before + dt.timedelta(seconds=group.valid_for),
            extended_key_usage=_EKU[group.eku],
            key_type=KeyType(group.key_type) if group.key_type else None,
        )

    def copy_identities(self, group: str, originals: Sequence[DeviceFiles]) -> list[DeviceFiles]:
        """Copies of other devices' keys and certificates (a clone keeps what it copied)."""
        return copy_identities(self.root / group, originals)

    def install_broker_certificate(self, kind: BrokerCertificate) -> None:
        """Replace ``broker/server.crt`` and ``.key`` (the broker uses them from its next start)."""
        now = dt.datetime.now(dt.UTC)
        if kind is BrokerCertificate.FLEET:
            issue_broker_certificate(
                self.workspace.paths,
                self.workspace.ca,
                key_type=self.workspace.config.broker_key_type,
            )
        elif kind is BrokerCertificate.SAME_KEY:
            install_broker_certificate(self.workspace, same_key=True)
        elif kind is BrokerCertificate.ROGUE_CA:
            install_broker_certificate(self.workspace, ca=self.rogue_ca)
        elif kind is BrokerCertificate.WRONG_HOSTNAME:
            install_broker_certificate(self.workspace, hosts=("broker.elsewhere.invalid",))
        else:
            assert kind is BrokerCertificate.EXPIRED
            install_broker_certificate(
                self.workspace,
                not_before=now - dt.timedelta(days=30),
                not_after=now - dt.timedelta(days=1),
            )


def broker_pin(server_cert: Path) -> str:
    """The ``sha256/…`` pin of the key in a broker certificate file (its first certificate)."""
    cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    return spki_pin(cert.public_bytes(serialization.Encoding.DER))

"""The fleet workspace: a documented directory layout, its creation and its opening.

::

    DIR/fleet.toml              settings (FleetConfig)
    DIR/fleet.db                the registry (SQLite, WAL)
    DIR/ca/root.crt, root.key   trust anchor (key 0600)
    DIR/ca/issuing.crt, .key    issuing intermediate, path length 0 (key 0600)
    DIR/ca/previous/            issuing CAs replaced by 'fleet ca rotate', trusted until retired
    DIR/ca/retired/             issuing CAs retired by 'fleet ca retire' (no CRL: refused)
    DIR/ca/crl.pem              one CRL per trusted issuing CA, current first, always present
    DIR/broker/server.crt, .key broker chain (leaf + intermediate) and key (0600)
    DIR/devices/<id>/cert.pem   device chain (leaf + intermediate)
    DIR/devices/<id>/key.pem    device key (0600); absent for devices provisioned from a CSR
    DIR/admin/cert.pem, key.pem the control plane's admin identity (chain; key 0600)
    DIR/claims/<name>/          a claim's cert.pem, key.pem (0600) and root.crt, for a factory
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fleet.kernel.config import FleetConfig
from fleet.kernel.errors import WorkspaceError
from fleet.kernel.files import PRIVATE_DIR_MODE, replace_atomically, write_public, write_secret
from fleet.kernel.identity import ADMIN, DeviceIdentity
from fleet.kernel.keys import (
    KeyType,
    PrivateKey,
    generate_private_key,
    key_type_of,
    load_private_key,
    private_key_pem,
)
from fleet.store.ca import CertificateAuthority, create_intermediate_ca, create_root_ca
from fleet.store.records import AdminRecord, DeviceRecord
from fleet.store.registry import Registry

DEFAULT_DIR = Path("fleet-data")
ROOT_VALIDITY = dt.timedelta(days=3650)
ISSUING_VALIDITY = dt.timedelta(days=1825)
BROKER_VALIDITY = dt.timedelta(days=365)
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_PEM = Encoding.PEM


@dataclass(frozen=True, slots=True)
class WorkspacePaths:
    """Where every file of a workspace lives."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "fleet.toml"

    @property
    def db(self) -> Path:
        return self.root / "fleet.db"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root.crt"

    @property
    def root_key(self) -> Path:
        return self.ca_dir / "root.key"

    @property
    def issuing_cert(self) -> Path:
        return self.ca_dir / "issuing.crt"

    @property
    def issuing_key(self) -> Path:
        return self.ca_dir / "issuing.key"

    @property
    def previous_issuers_dir(self) -> Path:
        """Issuing CAs replaced by a rotation, still trusted until retired."""
        return self.ca_dir / "previous"

    @property
    def retired_issuers_dir(self) -> Path:
        return self.ca_dir / "retired"

    @property
    def next_issuer_dir(self) -> Path:
        """Where a rotation stages the new issuing CA before swapping it in."""
        return self.ca_dir / "next"

    def previous_issuer_certs(self) -> list[Path]:
        return sorted(self.previous_issuers_dir.glob("*.crt"))

    def trusted_issuer_certs(self) -> list[Path]:
        """The trusted issuing CAs as they are on disk now: the current one, then those a
        rotation replaced (retired ones are not trusted)."""
        return [self.issuing_cert, *self.previous_issuer_certs()]

    @property
    def crl(self) -> Path:
        return self.ca_dir / "crl.pem"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def server_cert(self) -> Path:
        return self.broker_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.broker_dir / "server.key"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    @property
    def locks_dir(self) -> Path:
        return self.root / ".locks"

    @property
    def admin_dir(self) -> Path:
        return self.root / "admin"

    @property
    def admin_cert(self) -> Path:
        return self.admin_dir / "cert.pem"

    @property
    def admin_key(self) -> Path:
        return self.admin_dir / "key.pem"

    @property
    def claims_dir(self) -> Path:
        return self.root / "claims"

    def claim_dir(self, name: str) -> Path:
        return self.claims_dir / name

    def device_dir(self, device_id: str) -> Path:
        return self.devices_dir / device_id

    def device_cert(self, device_id: str) -> Path:
        return self.devices_dir / device_id / "cert.pem"

    def device_key(self, device_id: str) -> Path:
        return self.devices_dir / device_id / "key.pem"


class Workspace:
    """An initialised workspace: its paths, settings, registry and CA (loaded on first use)."""

    def __init__(self, paths: WorkspacePaths, config: FleetConfig) -> None:
        self.paths = paths
        self.config = config
        self.repairs: list[str] = []  # what opening finished for an interrupted command

    @classmethod
    def open(cls, root: Path) -> Workspace:
        """Open an existing workspace; tell the user to run ``fleet init`` when there is none.

        Opening also rolls back any provisioning run that was killed before it finished, and
        publishes a CRL a killed revocation committed but never published, so every caller
        sees a registry, a file tree and a CRL that agree.
        """
        paths = WorkspacePaths(root)
        if not paths.config.exists():
            if paths.ca_dir.exists():
                raise WorkspaceError(
                    f"{root}: incomplete workspace (an interrupted 'fleet init'?); "
                    "remove the directory and run 'fleet init' again"
                )
            raise WorkspaceError(
                f"{root}: no fleet workspace here; run 'fleet init --dir {root}' first"
            )
        workspace = cls(paths, FleetConfig.load(paths.config))
        if paths.next_issuer_dir.exists():
            from fleet.store.ca_rotation import finish_interrupted_rotation

            finish_interrupted_rotation(paths)
        workspace.recover_interrupted_runs(wait=False)
        from fleet.store.revocation import finish_crl_publication

        if finish_crl_publication(workspace):
            workspace.repairs.append(
                "published the CRL an interrupted revocation had committed but not written"
            )
        return workspace

    def recover_interrupted_runs(self, *, wait: bool = True) -> int:
        """Roll back provisioning runs that were killed before they finished.

        Returns the number of devices rolled back. With ``wait=False`` it does nothing while
        another process is provisioning (its pending rows are alive, not abandoned).
        """
        if not self.registry.pending_batches():
            return 0
        with self.lock("provision", wait=wait) as held:
            return self.roll_back_pending() if held else 0

    def roll_back_pending(self, batch_id: str | None = None) -> int:
        """Delete the files, then the rows, of pending batches (all, or ``batch_id``).

        The caller holds the ``provision`` lock. Files go first: pending rows mark what is left
        to remove, so a rollback that is itself interrupted is finished by the next one.
        """
        rolled_back = 0
        for batch, device_ids in self.registry.pending_batches().items():
            if batch_id is None or batch == batch_id:
                for device_id in device_ids:
                    shutil.rmtree(self.paths.device_dir(device_id), ignore_errors=True)
                self.registry.delete_batch(batch)
                rolled_back += len(device_ids)
        return rolled_back

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.paths.db)

    @cached_property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority(
            root_cert=_load_cert(self.paths.root_cert),
            issuing_cert=_load_cert(self.paths.issuing_cert),
            issuing_key=load_private_key(
                self.paths.issuing_key.read_bytes(), source=str(self.paths.issuing_key)
            ),
            crl_distribution_url=self.config.crl_url,
        )

    def identity_of(self, record: DeviceRecord) -> DeviceIdentity:
        """The identity a certificate for this registry record carries (its tier and env)."""
        return DeviceIdentity(
            device_id=record.device_id,
            tier=record.tier,
            env=record.env,
            trust_domain=self.config.trust_domain,
        )

    def root_key(self) -> PrivateKey | None:
        """The root CA's key (None when it is kept off this machine): it signs the root's CRL."""
        path = self.paths.root_key
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return load_private_key(data, source=str(path))

    def previous_authorities(self) -> list[CertificateAuthority]:
        """Issuing CAs replaced by a rotation and not yet retired (they still sign CRLs)."""
        authorities = []
        for cert_path in self.paths.previous_issuer_certs():
            key_path = cert_path.with_suffix(".key")
            authorities.append(
                CertificateAuthority(
                    root_cert=self.ca.root_cert,
                    issuing_cert=_load_cert(cert_path),
                    issuing_key=load_private_key(key_path.read_bytes(), source=str(key_path)),
                )
            )
        return authorities

    @contextmanager
    def lock(self, name: str, *, wait: bool = True) -> Iterator[bool]:
        """An advisory lock shared by every process on this workspace (``flock``).

        Yields True when held; with ``wait=False`` yields False at once if another holds it.
        """
        self.paths.locks_dir.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        fd = os.open(self.paths.locks_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise WorkspaceError(f"{path}: missing; the workspace is incomplete") from None
    except ValueError as exc:
        raise WorkspaceError(f"{path}: not a PEM certificate ({exc})") from exc


def init_workspace(
    root: Path,
    *,
    config: FleetConfig,
    hosts: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> Workspace:
    """Create a workspace: root and issuing CA, broker certificate, empty CRL, registry.

    Refuses to touch a directory that already holds a workspace. ``fleet.toml`` is written
    last, so an interrupted init never looks like a usable workspace.
    """
    now = now or dt.datetime.now(dt.UTC)
    paths = WorkspacePaths(root)
    if paths.config.exists() or paths.ca_dir.exists():
        raise WorkspaceError(f"{root}: already holds a fleet workspace; choose another --dir")
    root.mkdir(parents=True, exist_ok=True)
    for directory in (paths.ca_dir, paths.broker_dir, paths.locks_dir):
        directory.mkdir(mode=PRIVATE_DIR_MODE)
    paths.devices_dir.mkdir(mode=0o755)

    domain = config.trust_domain
    root_cert, root_key = create_root_ca(
        common_name=f"{domain} root CA",
        organization=domain,
        key_type=config.authority_key_type,
        not_before=now,
        not_after=now + ROOT_VALIDITY,
    )
    issuing_cert, issuing_key = create_intermediate_ca(
        parent_cert=root_cert,
        parent_key=root_key,
        common_name=f"{domain} issuing CA 1",
        organization=domain,
        key_type=config.authority_key_type,
        not_before=now,
        not_after=now + ISSUING_VALIDITY,
    )
    write_secret(paths.root_key, private_key_pem(root_key))
    write_public(paths.root_cert, root_cert.public_bytes(_PEM))
    write_secret(paths.issuing_key, private_key_pem(issuing_key))
    write_public(paths.issuing_cert, issuing_cert.public_bytes(_PEM))
    ca = CertificateAuthority(
        root_cert=root_cert,
        issuing_cert=issuing_cert,
        issuing_key=issuing_key,
        crl_distribution_url=config.crl_url,
    )
    issue_broker_certificate(paths, ca, hosts=hosts, now=now, key_type=config.broker_key_type)
    admin = issue_admin_bundle(paths.admin_dir, ADMIN_NAME, ca, config, now=now)

    registry = Registry(paths.db, create=True)
    try:
        registry.add_admin(admin_record(ADMIN_NAME, admin))
        crl = ca.build_crl(
            [],
            crl_number=registry.next_crl_number(),
            this_update=now,
            next_update=now + config.crl_valid_for,
        )
    finally:
        registry.close()
    replace_atomically(paths.crl, crl.public_bytes(_PEM))
    replace_atomically(paths.config, config.to_toml().encode())
    return Workspace(paths, config)


def issue_broker_certificate(
    paths: WorkspacePaths,
    ca: CertificateAuthority,
    *,
    hosts: Sequence[str] = (),
    now: dt.datetime | None = None,
    key: PrivateKey | None = None,
    key_type: KeyType | None = None,
) -> x509.Certificate:
    """(Re)issue ``broker/server.crt`` and ``server.key`` for localhost, 127.0.0.1 and ``hosts``,
    for a new key of ``key_type`` (default: the issuing CA's) or for ``key``: a renewal that
    keeps the key, so pins of it still hold."""
    now = now or dt.datetime.now(dt.UTC)
    key = key or generate_private_key(key_type or key_type_of(ca.issuing_key))
    cert = ca.issue_server(
        common_name="mtls-fleet broker",
        hosts=[*DEFAULT_HOSTS, *hosts],
        public_key=key.public_key(),
        not_before=now,
        not_after=now + BROKER_VALIDITY,
    )
    replace_atomically(paths.server_key, private_key_pem(key), mode=0o600)
    replace_atomically(paths.server_cert, ca.chain_pem(cert))
    return cert


ADMIN_NAME = "control-plane"
ADMIN_VALIDITY = dt.timedelta(days=365)


def issue_admin_bundle(
    directory: Path,
    name: str,
    ca: CertificateAuthority,
    config: FleetConfig,
    *,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """(Re)issue an admin identity into ``directory``: ``cert.pem`` (chain), ``key.pem`` (mode
    0600) and a copy of ``root.crt``. The caller records it in the registry."""
    now = now or dt.datetime.now(dt.UTC)
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    key = generate_private_key(key_type_of(ca.issuing_key))
    identity = DeviceIdentity(name, "bronze", "prod", config.trust_domain, role=ADMIN)
    cert = ca.issue_device(
        identity, key.public_key(), not_before=now, not_after=now + ADMIN_VALIDITY
    )
    replace_atomically(directory / "key.pem", private_key_pem(key), mode=0o600)
    replace_atomically(directory / "cert.pem", ca.chain_pem(cert))
    replace_atomically(directory / "root.crt", ca.root_cert.public_bytes(_PEM))
    return cert


def admin_record(name: str, cert: x509.Certificate) -> AdminRecord:
    return AdminRecord(
        name, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc
    )


def issue_admin_certificate(workspace: Workspace, *, now: dt.datetime | None = None) -> None:
    """(Re)issue ``admin/``, the control plane's own admin identity, and record it: it connects
    to brokers with it (client id ``admin:control-plane``), and ``fleet ... --server`` can call
    the admin API with it."""
    cert = issue_admin_bundle(
        workspace.paths.admin_dir, ADMIN_NAME, workspace.ca, workspace.config, now=now
    )
    workspace.registry.add_admin(admin_record(ADMIN_NAME, cert))


def ensure_admin_certificate(workspace: Workspace) -> None:
    """Give the control plane an admin identity issued by the current issuing CA, recorded in
    the registry, and valid for more than a week (a workspace made before admin identities
    existed, or after ``fleet ca rotate``, gets a fresh one)."""
    paths = workspace.paths
    if all(p.exists() for p in (paths.admin_cert, paths.admin_key, paths.admin_dir / "root.crt")):
        cert = _load_cert(paths.admin_cert)
        current_issuer = cert.issuer == workspace.ca.issuing_cert.subject
        lasting = cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=7)
        status = workspace.registry.admin_status(cert.serial_number)
        if status is None:  # issued before admin identities were recorded
            workspace.registry.add_admin(admin_record(ADMIN_NAME, cert))
            status = "active"
        if current_issuer and lasting and status == "active":
            return
    issue_admin_certificate(workspace)

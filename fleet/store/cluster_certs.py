"""Certificates for a Dask cluster that runs the swarm (``fleet cluster certs``).

Device keys travel to the workers over Dask's comms, so those comms must be mutual TLS with
certificates the fleet CA issues: the scheduler, the workers and the client (``fleet swarm
--scheduler``) each get a key (mode 0600) and a chain, and every one of them trusts only the
fleet's root. What ``dask scheduler --tls-*`` and ``dask worker --tls-*`` need is written to one
directory::

    ca.pem                       the fleet's root (--tls-ca-file)
    scheduler.pem, scheduler.key  --tls-cert / --tls-key of 'dask scheduler'
    worker.pem, worker.key        the same for every 'dask worker'
    client.pem, client.key        read by 'fleet swarm --scheduler' (--cluster-certs)

Every certificate has EKU serverAuth and clientAuth (Dask's peers are both) and the host names
given as SANs (Dask does not check them, but a reader can). They are short-lived (7 days by
default) and not recorded in the registry: issue them again for the next campaign.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from fleet.kernel.errors import UsageError
from fleet.kernel.files import PRIVATE_DIR_MODE, replace_atomically
from fleet.kernel.keys import generate_private_key, key_type_of, private_key_pem
from fleet.store.workspace import Workspace

ROLES = ("scheduler", "worker", "client")
CA_FILE = "ca.pem"
DEFAULT_VALIDITY = dt.timedelta(days=7)
_BOTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


@dataclass(frozen=True, slots=True)
class ClusterCertificates:
    """Where one cluster's files are; ``cert(role)`` and ``key(role)`` for each of ROLES."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_FILE

    def cert(self, role: str) -> Path:
        return self.directory / f"{role}.pem"

    def key(self, role: str) -> Path:
        return self.directory / f"{role}.key"

    def security(self, *, cluster: bool = False) -> Any:
        """A ``distributed.security.Security``: the client's (default), or with ``cluster``
        the scheduler's and workers' too (a LocalCluster's); mutual TLS required."""
        from distributed.security import Security

        roles = ("client", "scheduler", "worker") if cluster else ("client",)
        files = {}
        for role in roles:
            files[f"tls_{role}_cert"] = str(self.cert(role))
            files[f"tls_{role}_key"] = str(self.key(role))
        return Security(tls_ca_file=str(self.ca), require_encryption=True, **files)

    def local_cluster(self, workers: int = 2) -> Any:
        """A ``distributed.LocalCluster`` of ``workers`` single-threaded worker processes on
        127.0.0.1 with these certificates (for tests and the benchmark); a context manager."""
        from distributed import LocalCluster

        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            protocol="tls",
            host="127.0.0.1",
            security=self.security(cluster=True),
            dashboard_address=None,
        )

    def missing(self) -> list[Path]:
        files = [self.ca, *(p for r in ROLES for p in (self.cert(r), self.key(r)))]
        return [path for path in files if not path.is_file()]


def issue_cluster_certificates(
    workspace: Workspace,
    out: Path,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    valid_for: dt.timedelta = DEFAULT_VALIDITY,
    now: dt.datetime | None = None,
) -> ClusterCertificates:
    """Issue the scheduler's, workers' and client's certificates into ``out`` (made 0700)."""
    if valid_for <= dt.timedelta(0):
        raise UsageError("--valid-for must be positive")
    now = now or dt.datetime.now(dt.UTC)
    ca = workspace.ca
    out.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    files = ClusterCertificates(out)
    for role in ROLES:
        key = generate_private_key(key_type_of(ca.issuing_key))
        cert = ca.issue_server(
            common_name=f"dask-{role}.{workspace.config.trust_domain}",
            hosts=hosts,
            public_key=key.public_key(),
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + valid_for,
            extended_key_usage=_BOTH,
        )
        replace_atomically(files.key(role), private_key_pem(key), mode=0o600)
        replace_atomically(files.cert(role), ca.chain_pem(cert))
    replace_atomically(files.ca, ca.root_cert.public_bytes(Encoding.PEM))
    return files

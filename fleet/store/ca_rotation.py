"""Rotating the issuing CA: a new intermediate signs from now on, the old one is trusted until
retired, so devices on either chain work during the overlap.

``rotate_issuing_ca`` stages the new intermediate in ``ca/next/``, keeps a copy of the current
one in ``ca/previous/``, then renames the new key and certificate into place. A crash between
those renames is finished by the next command that opens the workspace. ``retire_previous_issuers``
moves the previous intermediates to ``ca/retired/``: the next CRL no longer covers them, and a
broker without a CRL for an issuer refuses its certificates (and ours closes their sessions).
``revoke_issuing_cas`` is the emergency for a compromised intermediate (rotate first): the root's
CRL lists it, so every broker that checks the whole chain refuses its devices, and ours closes
their live sessions (``issuer_revoked``).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fleet.kernel.errors import UsageError
from fleet.kernel.files import PRIVATE_DIR_MODE, write_public, write_secret
from fleet.kernel.keys import load_private_key, private_key_pem
from fleet.store.ca import create_intermediate_ca
from fleet.store.revocation import publish_crl
from fleet.store.workspace import (
    ISSUING_VALIDITY,
    Workspace,
    WorkspacePaths,
    issue_admin_certificate,
)


def rotate_issuing_ca(workspace: Workspace, *, now: dt.datetime | None = None) -> x509.Certificate:
    """Make a new issuing intermediate current; the old one stays trusted (``ca/previous/``)."""
    now = now or dt.datetime.now(dt.UTC)
    paths = workspace.paths
    with workspace.lock("provision"), workspace.lock("crl"):
        root_key = load_private_key(paths.root_key.read_bytes(), source=str(paths.root_key))
        root_cert = workspace.ca.root_cert
        generation = len(paths.previous_issuer_certs()) + len(
            list(paths.retired_issuers_dir.glob("*.crt"))
        )
        domain = workspace.config.trust_domain
        cert, key = create_intermediate_ca(
            parent_cert=root_cert,
            parent_key=root_key,
            common_name=f"{domain} issuing CA {generation + 2}",
            organization=domain,
            key_type=workspace.config.authority_key_type,
            not_before=now,
            not_after=now + ISSUING_VALIDITY,
        )
        shutil.rmtree(paths.next_issuer_dir, ignore_errors=True)
        paths.next_issuer_dir.mkdir(mode=PRIVATE_DIR_MODE)
        write_secret(paths.next_issuer_dir / "issuing.key", private_key_pem(key))
        write_public(paths.next_issuer_dir / "issuing.crt", cert.public_bytes(Encoding.PEM))
        finish_interrupted_rotation(paths)
    workspace.__dict__.pop("ca", None)  # the cached CA is the old one
    publish_crl(workspace, now=now)
    # The control plane's own identity moves to the new issuer now, so retiring the old one
    # later cannot lock it out of the brokers.
    issue_admin_certificate(workspace, now=now)
    return cert


def finish_interrupted_rotation(paths: WorkspacePaths) -> None:
    """Complete a staged rotation: keep the current issuer in ``previous/``, swap the new in."""
    staged_key = paths.next_issuer_dir / "issuing.key"
    staged_cert = paths.next_issuer_dir / "issuing.crt"
    if staged_key.exists():  # the current issuer has not been replaced yet: keep it
        current = x509.load_pem_x509_certificate(paths.issuing_cert.read_bytes())
        _keep_previous(paths, current)
        os.replace(staged_key, paths.issuing_key)
    if staged_cert.exists():
        os.replace(staged_cert, paths.issuing_cert)
    shutil.rmtree(paths.next_issuer_dir, ignore_errors=True)


def _keep_previous(paths: WorkspacePaths, current: x509.Certificate) -> None:
    paths.previous_issuers_dir.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
    stem = paths.previous_issuers_dir / format(current.serial_number, "x")
    if not stem.with_suffix(".key").exists():
        write_secret(stem.with_suffix(".key"), paths.issuing_key.read_bytes())
    if not stem.with_suffix(".crt").exists():
        write_public(stem.with_suffix(".crt"), current.public_bytes(Encoding.PEM))


def retire_previous_issuers(workspace: Workspace, *, now: dt.datetime | None = None) -> list[str]:
    """Stop trusting every previous issuing CA; returns their subjects."""
    paths = workspace.paths
    retired = []
    with workspace.lock("crl"):
        for cert_path in paths.previous_issuer_certs():
            paths.retired_issuers_dir.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            for path in (cert_path, cert_path.with_suffix(".key")):
                if path.exists():
                    os.replace(path, paths.retired_issuers_dir / path.name)
            retired.append(cert.subject.rfc4514_string())
    if retired:
        publish_crl(workspace, now=now)
    return retired


def revoke_issuing_cas(
    workspace: Workspace,
    *,
    serial: int | None = None,
    reason: x509.ReasonFlags = x509.ReasonFlags.ca_compromise,
    now: dt.datetime | None = None,
) -> list[str]:
    """Put issuing CAs a rotation replaced (the one with ``serial``, or every previous one) on
    the root's CRL and publish it; returns the subjects revoked now. The current issuing CA is
    refused: rotate first, so that the fleet can still issue."""
    now = now or dt.datetime.now(dt.UTC)
    paths = workspace.paths
    current = workspace.ca.issuing_cert
    if serial == current.serial_number:
        raise UsageError(
            f"{current.subject.rfc4514_string()} is the current issuing CA: run 'fleet ca rotate' "
            "first, then revoke it (the fleet needs an issuing CA that is not revoked)"
        )
    if workspace.root_key() is None:
        raise UsageError(f"{paths.root_key} is missing: only the root can revoke an issuing CA")
    known = [*paths.previous_issuer_certs(), *sorted(paths.retired_issuers_dir.glob("*.crt"))]
    candidates = [x509.load_pem_x509_certificate(path.read_bytes()) for path in known]
    if serial is None:
        chosen = [c for c in candidates if c in _load_all(paths.previous_issuer_certs())]
    else:
        chosen = [c for c in candidates if c.serial_number == serial]
        if not chosen:
            raise UsageError(
                f"no issuing CA with serial {serial:X} in {paths.ca_dir} (previous or retired)"
            )
    revoked = [
        cert.subject.rfc4514_string()
        for cert in chosen
        if workspace.registry.revoke_issuer(
            cert.serial_number, cert.subject.rfc4514_string(), reason, now=now
        )
    ]
    if revoked:
        publish_crl(workspace, now=now)
    return revoked


def _load_all(paths: list[Path]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(path.read_bytes()) for path in paths]

"""The certificates a handshake bench connects with: one distinct identity per connection.

Accepted identities are ordinary fleet devices (prefix ``hs-<key type>``), provisioned once and
reused by later runs. ``reject_mix`` adds, in equal shares, identities the broker must refuse:
revoked devices (revoked in the registry, one CRL published), expired ones (also kept for later
runs) and devices of a rogue CA (made for the run in ``DIR/bench/`` and removed after it).
"""

from __future__ import annotations

import datetime as dt
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from cryptography import x509

from device.handshake_bench import BenchError, Identity
from fleet.kernel.keys import KeyType
from fleet.store.provisioning import ProvisionSpec, provision_devices
from fleet.store.revocation import publish_crl
from fleet.store.testing import issue_devices, rogue_authority
from fleet.store.workspace import Workspace

REJECT_KINDS = ("revoked", "expired", "rogue-ca")


def _usable(workspace: Workspace, prefix: str, status: str, now: dt.datetime) -> list[str]:
    """Ids of devices named ``prefix-NNNNN`` whose effective status is ``status``."""
    pattern = f"{prefix}-"
    return [
        record.device_id
        for record in workspace.registry.devices()
        if record.device_id.startswith(pattern)
        and record.device_id[len(pattern) :].isdigit()
        and record.effective_status(now) == status
    ]


def _ensure(
    workspace: Workspace, prefix: str, count: int, status: str, spec: ProvisionSpec
) -> list[str]:
    have = _usable(workspace, prefix, status, dt.datetime.now(dt.UTC))
    if len(have) < count:
        provision_devices(workspace, replace(spec, count=count - len(have)))
        have = _usable(workspace, prefix, status, dt.datetime.now(dt.UTC))
    if len(have) < count:
        raise BenchError(f"could only prepare {len(have)} of {count} {status} identities")
    return have[:count]


@contextmanager
def bench_identities(
    workspace: Workspace,
    count: int,
    *,
    key_type: KeyType | None = None,
    reject_mix: float = 0.0,
    seed: int = 7,
) -> Iterator[list[Identity]]:
    """``count`` identities, ``reject_mix`` of them to be refused, shuffled reproducibly."""
    kind = (key_type or workspace.config.key_type).value
    rejects = round(count * reject_mix)
    shares = [rejects // 3 + (1 if i < rejects % 3 else 0) for i in range(3)]
    paths = workspace.paths
    identities = []
    accepted = _ensure(
        workspace,
        f"hs-{kind}",
        count - rejects,
        "active",
        ProvisionSpec(
            count=1, prefix=f"hs-{kind}", key_type=key_type, valid_for=dt.timedelta(days=365)
        ),
    )
    identities += [Identity(i, paths.device_cert(i), paths.device_key(i)) for i in accepted]
    if shares[0]:
        revoked = _revoked(workspace, f"hs-{kind}-revoked", shares[0], key_type)
        identities += [
            Identity(i, paths.device_cert(i), paths.device_key(i), "revoked") for i in revoked
        ]
    if shares[1]:
        now = dt.datetime.now(dt.UTC)
        expired = _ensure(
            workspace,
            f"hs-{kind}-expired",
            shares[1],
            "expired",
            ProvisionSpec(
                count=1,
                prefix=f"hs-{kind}-expired",
                key_type=key_type,
                not_before=now - dt.timedelta(days=2),
                valid_for=dt.timedelta(days=1),
            ),
        )
        identities += [
            Identity(i, paths.device_cert(i), paths.device_key(i), "expired") for i in expired
        ]
    scratch = paths.root / "bench"
    scratch.mkdir(exist_ok=True)
    directory = tempfile.mkdtemp(prefix="rogue-", dir=scratch)
    try:
        if shares[2]:
            start = dt.datetime.now(dt.UTC).replace(microsecond=0)
            rogue = issue_devices(
                workspace,
                rogue_authority(workspace),
                Path(directory) / "credentials",
                [f"hs-rogue-{n:05d}" for n in range(1, shares[2] + 1)],
                not_before=start,
                not_after=start + dt.timedelta(hours=1),
            )
            identities += [Identity(f.device_id, f.cert, f.key, "rogue-ca") for f in rogue]
        random.Random(seed).shuffle(identities)
        yield identities
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _revoked(workspace: Workspace, prefix: str, count: int, key_type: KeyType | None) -> list[str]:
    now = dt.datetime.now(dt.UTC)
    have = _usable(workspace, prefix, "revoked", now)
    if len(have) < count:
        fresh = provision_devices(
            workspace, ProvisionSpec(count=count - len(have), prefix=prefix, key_type=key_type)
        ).device_ids
        for device_id in fresh:
            workspace.registry.revoke(device_id, x509.ReasonFlags.unspecified, now=now)
        publish_crl(workspace, now=now)
        have = _usable(workspace, prefix, "revoked", dt.datetime.now(dt.UTC))
    return have[:count]

"""Claims: one certificate shared by a batch of new devices, good only for enrolling.

The bootstrap problem: a new device needs a certificate, but must authenticate to get one. A
factory flashes every device of a batch with the same *claim* (``DIR/claims/<name>/``: the
claim's ``cert.pem``, ``key.pem`` and the fleet's ``root.crt``). A device connects with it,
generates its own key and asks for its own certificate (see :mod:`fleet.kernel.mqtt_api`); the claim's
rules decide: how many devices it may enroll, which ids they may take, until when.

The registry is the truth: a claim directory whose claim is not recorded (a crash between the
two) enrolls nobody and is replaced by the next ``fleet claim create`` of that name.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import shutil
from dataclasses import dataclass

from cryptography import x509

from fleet.kernel.errors import NameTakenError, UnknownClaimError, UsageError
from fleet.kernel.files import PRIVATE_DIR_MODE, write_public, write_secret
from fleet.kernel.identity import (
    CLAIM,
    DeviceIdentity,
    validate_device_id,
    validate_env,
    validate_tier,
)
from fleet.kernel.keys import generate_private_key, key_type_of, private_key_pem
from fleet.store.records import ClaimRecord
from fleet.store.revocation import publish_crl
from fleet.store.workspace import Workspace

DEFAULT_CLAIM_VALIDITY = dt.timedelta(days=30)
DEFAULT_MAX_USES = 1000


@dataclass(frozen=True, slots=True)
class ClaimRules:
    """What ``fleet claim create`` asks for."""

    name: str
    max_uses: int = DEFAULT_MAX_USES
    valid_for: dt.timedelta = DEFAULT_CLAIM_VALIDITY
    allow_ids: str = "*"  # shell pattern, e.g. 'sensor-*'
    tier: str = "bronze"  # of the devices it enrolls
    env: str = "prod"
    device_valid_for: dt.timedelta | None = None  # default: the workspace's device validity

    def validate(self) -> None:
        validate_device_id(self.name)
        validate_tier(self.tier)
        validate_env(self.env)
        if self.max_uses < 1:
            raise UsageError(f"--max-uses must be at least 1, not {self.max_uses}")
        if not self.allow_ids or "/" in self.allow_ids:
            raise UsageError(f"--allow-ids {self.allow_ids!r}: give a pattern such as 'sensor-*'")


def allows_id(claim: ClaimRecord, device_id: str) -> bool:
    """Whether ``claim`` may enroll a device named ``device_id`` (its ``allow_ids`` pattern)."""
    return fnmatch.fnmatchcase(device_id, claim.allow_ids)


def create_claim(
    workspace: Workspace, rules: ClaimRules, *, now: dt.datetime | None = None
) -> ClaimRecord:
    """Issue the claim certificate, write ``DIR/claims/<name>/`` and record the claim."""
    rules.validate()
    now = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    paths = workspace.paths
    directory = paths.claim_dir(rules.name)
    with workspace.lock("claims"):
        try:
            workspace.registry.claim(rules.name)
        except UnknownClaimError:
            pass
        else:
            raise NameTakenError(
                f"claim {rules.name!r} already exists; choose another --name "
                "('fleet claim list' shows them)",
                field="name",
            )
        shutil.rmtree(directory, ignore_errors=True)  # left by a crash: never recorded
        key = generate_private_key(key_type_of(workspace.ca.issuing_key))
        identity = DeviceIdentity(
            rules.name, rules.tier, rules.env, workspace.config.trust_domain, role=CLAIM
        )
        not_after = now + rules.valid_for
        cert = workspace.ca.issue_device(
            identity, key.public_key(), not_before=now, not_after=not_after
        )
        paths.claims_dir.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        staging = paths.claims_dir / f".{rules.name}.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=PRIVATE_DIR_MODE)
        write_secret(staging / "key.pem", private_key_pem(key))
        write_public(staging / "cert.pem", workspace.ca.chain_pem(cert))
        write_public(staging / "root.crt", paths.root_cert.read_bytes())
        staging.rename(directory)
        record = ClaimRecord(
            name=rules.name,
            serial=cert.serial_number,
            tier=rules.tier,
            env=rules.env,
            allow_ids=rules.allow_ids,
            max_uses=rules.max_uses,
            uses=0,
            device_valid_for=rules.device_valid_for or workspace.config.device_valid_for,
            not_after=not_after,
            created_at=now,
        )
        workspace.registry.add_claim(record)
    return record


def revoke_claim(
    workspace: Workspace,
    name: str,
    *,
    reason: x509.ReasonFlags = x509.ReasonFlags.cessation_of_operation,
    now: dt.datetime | None = None,
) -> bool:
    """Stop ``name`` enrolling anyone: recorded, and its certificate on a fresh CRL so brokers
    refuse it at the handshake. Devices it enrolled keep their own certificates.

    False when it was already revoked (no new CRL then).
    """
    now = now or dt.datetime.now(dt.UTC)
    if not workspace.registry.revoke_claim(name, reason, now=now):
        return False
    publish_crl(workspace, now=now)
    return True

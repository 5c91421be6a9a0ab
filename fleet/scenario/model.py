"""What a scenario file says, as typed dataclasses (built and validated by :mod:`.loader`;
the steps are in :mod:`.steps`, one class per kind).

Durations are seconds (floats). Every step keeps the line it came from, so the report and
the errors can point at the file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from device.outcomes import REASONS_BY_OUTCOME
from device.settings import DeviceBehaviour

if TYPE_CHECKING:
    from fleet.scenario.steps import Step

REVOCATION_POLICIES = ("fail-closed", "fail-open")
CRL_SOURCES = ("file", "control-plane")  # where the embedded broker reads its CRL


class Issuer(enum.StrEnum):
    """Who signs a group's certificates."""

    FLEET = "fleet"  # the workspace's issuing CA (recorded in the registry)
    ROGUE_CA = "rogue-ca"  # a second, unrelated root and intermediate with the same names
    EXPIRED_INTERMEDIATE = "expired-intermediate"  # the fleet root, via an expired intermediate


class Eku(enum.StrEnum):
    CLIENT_AUTH = "client-auth"
    SERVER_AUTH = "server-auth"  # a device certificate a strict broker must refuse
    NONE = "none"


class BrokerCertificate(enum.StrEnum):
    """What the embedded broker presents after a ``broker_certificate`` step."""

    FLEET = "fleet"  # a proper one from the fleet CA
    ROGUE_CA = "rogue-ca"
    WRONG_HOSTNAME = "wrong-hostname"
    EXPIRED = "expired"
    SAME_KEY = "same-key"  # re-issued by the fleet CA for the key it has now (a pin still holds)


class DeviceState(enum.StrEnum):
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # not connected, for whatever reason (includes rejected)
    REJECTED = "rejected"  # not connected, and the latest attempt was refused


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    count: int
    line: int
    tier: str = "bronze"
    env: str = "prod"
    valid_for: float = 3600.0
    starts_in: float = 0.0  # notBefore relative to provisioning; negative: already valid
    issuer: Issuer = Issuer.FLEET
    eku: Eku = Eku.CLIENT_AUTH
    clone_of: str | None = None  # use that group's certificates and ids (same identity twice)
    client_id_of: str | None = None  # own certificate, but that group's ids as MQTT client id
    enroll_with: str | None = None  # no provisioning: enrolls through this claim (enroll step)
    holds_claim: str | None = None  # connects with this claim's own certificate
    auto_renew: float | None = None  # renew over MQTT at this fraction of the lifetime
    impersonates: str | None = None  # off-fleet certificates carrying that group's device ids
    pin_broker: bool = False  # pin the key the broker presents when the group is provisioned
    presents_certificate: bool = True  # False: connects without a client certificate
    key_type: str | None = None  # the workspace's default, or e.g. rsa2048 (a weak key)
    groups: tuple[str, ...] = ()  # key-exchange groups offered, preferred first; (): P-256

    @property
    def fleet_issued(self) -> bool:
        """Provisioned (or enrolled) through the registry like any real device."""
        return (
            self.issuer is Issuer.FLEET
            and self.eku is Eku.CLIENT_AUTH
            and self.holds_claim is None
            and self.impersonates is None
        )

    @property
    def provisioned(self) -> bool:
        """Its members exist from a ``provision`` step (not from enrollment or a claim)."""
        return self.enroll_with is None and self.holds_claim is None


@dataclass(frozen=True, slots=True)
class BrokerSpec:
    env: str | None = None
    revocation_policy: str = "fail-closed"
    needs_fleet_broker: str | None = None  # why the scenario cannot run against --target
    crl_from: str = "file"  # or "control-plane": the broker fetches it from 'fleet serve'
    policy: Path | None = None  # the embedded broker's access policy (--policy)
    groups: tuple[str, ...] = ()  # key-exchange groups the embedded broker accepts (--groups)
    key_type: str | None = None  # the broker certificate's key (fleet init --broker-key-type)


# A scenario's devices unless its ``devices:`` says otherwise: quicker than a real fleet's.
SCENARIO_DEVICES = DeviceBehaviour(
    publish_every=1.0, backoff_base=0.2, backoff_cap=2.0, connect_timeout=5.0
)


@dataclass(frozen=True, slots=True)
class Selector:
    """Devices named in a step: whole groups, or 1-based members (``sensors#3``, ``sensors#2-5``)."""

    refs: tuple[tuple[str, int | None, int | None], ...]  # (group, first, last); None: all
    text: str


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    path: Path
    seed: int
    groups: tuple[Group, ...]
    broker: BrokerSpec
    devices: DeviceBehaviour
    steps: tuple[Step, ...]
    timeout: float = 120.0  # the whole scenario, a safety net
    crl_valid_for: float | None = None  # the fresh workspace's CRL lifetime (default 7 days)
    certificate_requests: bool = False  # the control plane answers enrollment/renewal over MQTT
    ca_key_type: str | None = None  # the fresh workspace's CAs (fleet init --ca-key-type)
    tags: tuple[str, ...] = field(default=())

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)


def _device_sightings() -> tuple[str, ...]:
    outcomes = tuple(str(o) for o in REASONS_BY_OUTCOME)
    reasons = sorted({str(r) for rs in REASONS_BY_OUTCOME.values() for r in rs})
    pairs = (f"{o}: {r}" for o, rs in REASONS_BY_OUTCOME.items() for r in rs)
    return (*outcomes, *reasons, *pairs)


# What ``device:`` may expect: an outcome (``rejected_by_broker``, ``dropped`` …), a reason
# (``certificate_revoked``) or both (``broker_untrusted: pin_mismatch``); compared exactly.
DEVICE_SIGHTINGS = _device_sightings()


def sighting_matches(expected: str, outcome: str, reason: str | None) -> bool:
    """Whether a device's sighting (outcome and reason) is the one ``expected`` names."""
    if ": " in expected:
        want_outcome, want_reason = expected.split(": ", 1)
        return (outcome, reason) == (want_outcome, want_reason)
    if expected in REASONS_BY_OUTCOME:
        return outcome == expected
    return reason == expected

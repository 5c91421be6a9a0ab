"""How a device's identity, tier and environment are written into, and read from, a certificate.

The encoding, documented in the README, is what the broker (ours or anyone's) reads:

* ``CN`` is the device id (Mosquitto's ``use_identity_as_username`` picks it up unchanged);
* a SAN URI ``spiffe://<trust-domain>/device/<id>`` carries the id and the trust domain;
* two ``OU`` attributes carry ``tier:<bronze|silver|gold>`` and ``env:<prod|dev>``;
* ``O`` is the trust domain.

Two other kinds of principal carry the same fields, told apart by their role (the SPIFFE path
segment and an ``OU role:<role>``): a *claim* certificate, shared by a batch of new devices and
good only for enrollment, and the control plane's *admin* certificate. Their names follow the
device-id rules; a device certificate has no ``role`` OU.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from fleet.kernel.errors import CertificateError, UsageError

TIERS = ("bronze", "silver", "gold")
ENVIRONMENTS = ("prod", "dev")
DEVICE, CLAIM, ADMIN = "device", "claim", "admin"
ROLES = (DEVICE, CLAIM, ADMIN)

_DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_SPIFFE = re.compile(r"^spiffe://(?P<domain>[^/]+)/(?P<role>device|claim|admin)/(?P<id>[^/]+)$")


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is usable in file names and MQTT topics, else raise."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise UsageError(
            f"invalid device id {device_id!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def validate_trust_domain(domain: str) -> str:
    """Return ``domain`` if it is a valid SPIFFE trust domain name, else raise."""
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise UsageError(
            f"invalid trust domain {domain!r}: use lower-case letters, digits, '.' and '-' "
            "(e.g. fleet.example.com)"
        )
    return domain


def validate_tier(tier: str) -> str:
    if tier not in TIERS:
        raise UsageError(f"invalid tier {tier!r}: choose one of {', '.join(TIERS)}")
    return tier


def validate_env(env: str) -> str:
    if env not in ENVIRONMENTS:
        raise UsageError(f"invalid environment {env!r}: choose one of {', '.join(ENVIRONMENTS)}")
    return env


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who a device (or a claim, or the admin) is, as its certificate says.

    For a claim or the admin, ``device_id`` is the claim's or the admin's name.
    """

    device_id: str
    tier: str
    env: str
    trust_domain: str
    role: str = DEVICE

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        validate_tier(self.tier)
        validate_env(self.env)
        validate_trust_domain(self.trust_domain)
        if self.role not in ROLES:
            raise UsageError(f"invalid role {self.role!r}: choose one of {', '.join(ROLES)}")

    @property
    def spiffe_uri(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.role}/{self.device_id}"

    def subject(self) -> x509.Name:
        """The certificate subject that encodes this identity."""
        units = [f"tier:{self.tier}", f"env:{self.env}"]
        if self.role != DEVICE:
            units.append(f"role:{self.role}")
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain),
                *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in units),
                x509.NameAttribute(NameOID.COMMON_NAME, self.device_id),
            ]
        )

    def subject_alternative_name(self) -> x509.SubjectAlternativeName:
        return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(self.spiffe_uri)])


def valid_until(cert: x509.Certificate) -> dt.datetime:
    """The end of the certificate's validity: RFC 5280 (4.1.2.5) counts notAfter in, to the
    second, and so does OpenSSL's check. A session is closed, and a handshake refused as
    ``certificate_expired``, from this moment on, so both agree at the second boundary."""
    return cert.not_valid_after_utc + dt.timedelta(seconds=1)


def identity_from_certificate(cert: x509.Certificate) -> DeviceIdentity:
    """Read the identity a fleet device certificate carries.

    Raises :class:`CertificateError` naming what is missing or inconsistent (no CN, no SPIFFE
    URI, CN and URI disagreeing, no tier or environment).
    """
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(common_names) != 1:
        raise CertificateError("certificate has no single CN naming the device")
    device_id = str(common_names[0].value)
    units = [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    tier = _tagged_value(units, "tier", device_id)
    env = _tagged_value(units, "env", device_id)
    domain, role = _spiffe_domain_and_role(cert, device_id)
    roles = [unit.split(":", 1)[1] for unit in units if unit.startswith("role:")]
    if roles != ([] if role == DEVICE else [role]):
        raise CertificateError(
            f"the OU role {roles} disagrees with the SAN URI's role {role!r}", device_id=device_id
        )
    try:
        return DeviceIdentity(
            device_id=device_id, tier=tier, env=env, trust_domain=domain, role=role
        )
    except UsageError as exc:
        raise CertificateError(str(exc), device_id=device_id) from exc


def _tagged_value(units: list[str], tag: str, device_id: str) -> str:
    values = [unit.split(":", 1)[1] for unit in units if unit.startswith(f"{tag}:")]
    if len(values) != 1:
        raise CertificateError(f"certificate has no single OU '{tag}:...'", device_id=device_id)
    return values[0]


def _spiffe_domain_and_role(cert: x509.Certificate, device_id: str) -> tuple[str, str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError("certificate has no subjectAltName", device_id=device_id) from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        match = _SPIFFE.fullmatch(uri)
        if match is None:
            continue
        if match["id"] != device_id:
            raise CertificateError(
                f"SAN URI {uri!r} names another device than the CN", device_id=device_id
            )
        return match["domain"], match["role"]
    raise CertificateError(
        "certificate has no SAN URI spiffe://<domain>/device/<id>", device_id=device_id
    )

"""The control plane's MQTT API: enrollment by claim and renewal, as topics and JSON messages.

Shared by the three parties so none of them spells a topic differently:

* a new device connects with a *claim* certificate and the client id ``enroll:<request-id>``,
  subscribes to ``$fleet/provision/<request-id>/reply`` and publishes an :class:`EnrollRequest`
  to ``$fleet/provision/<request-id>/request``;
* an enrolled device renews with its own certificate: it subscribes to
  ``$fleet/renew/<device-id>/reply`` and publishes a :class:`RenewRequest` to
  ``$fleet/renew/<device-id>/request``;
* the control plane connects with the *admin* certificate (client id ``admin:<name>``),
  subscribes to both request topics with a ``+`` for the id and answers on the reply topic with
  a :class:`Reply`.

Every request carries a proof of possession: the certificate the device connected with and a
signature, by that certificate's key, over the topic kind, the request id, the device id, a
timestamp and the CSR (:class:`Proof`), so a captured request cannot be replayed later or
with other ids. The
control plane checks the proof itself, so it never has to trust the broker to say who
published (Mosquitto, EMQX … know nothing of claims); the broker's topic rights are a second
fence that keeps claim certificates away from everything else.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fleet.kernel.bounded_json import JsonRejected, loads_bounded
from fleet.kernel.errors import UsageError
from fleet.kernel.keys import PrivateKey, sign_bytes, signature_is_valid

PROVISION = "provision"
RENEW = "renew"
ENROLL_CLIENT_PREFIX = "enroll:"
ADMIN_CLIENT_PREFIX = "admin:"
REQUEST_SUBSCRIPTIONS = ("$fleet/provision/+/request", "$fleet/renew/+/request")
REPLY_PUBLICATIONS = ("$fleet/provision/+/reply", "$fleet/renew/+/reply")

_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_TOPIC = re.compile(r"\$fleet/(?P<kind>provision|renew)/(?P<id>[A-Za-z0-9._-]{1,64})/request")
MAX_MESSAGE = 64 * 1024


class ProtocolError(UsageError):
    """A message that does not follow this API; ``field`` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def is_request_id(text: str) -> bool:
    return bool(_REQUEST_ID.fullmatch(text))


def request_topic(kind: str, subject: str) -> str:
    """``$fleet/<kind>/<request-id or device-id>/request``."""
    return f"$fleet/{kind}/{subject}/request"


def reply_topic(kind: str, subject: str) -> str:
    return f"$fleet/{kind}/{subject}/reply"


def parse_request_topic(topic: str) -> tuple[str, str] | None:
    """(kind, request-id or device-id) of a request topic; None for any other topic."""
    match = _TOPIC.fullmatch(topic)
    return (match["kind"], match["id"]) if match else None


def enroll_client_id(request_id: str) -> str:
    return f"{ENROLL_CLIENT_PREFIX}{request_id}"


# -- proof of possession ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proof:
    """What a request's signature covers: every field that decides what gets issued.

    ``subject`` is the topic's id (the request id of an enrollment, the device id of a
    renewal); ``timestamp`` (ISO 8601, UTC) lets the control plane refuse old requests, so a
    captured request cannot be replayed later, nor with another request id or device id.
    """

    kind: str
    subject: str
    request_id: str
    device_id: str
    timestamp: str
    csr_pem: str

    def signed_bytes(self) -> bytes:
        fields = (self.kind, self.subject, self.request_id, self.device_id, self.timestamp)
        return b"\n".join((b"mtls-fleet/2", *(f.encode() for f in fields), self.csr_pem.encode()))


MAX_REQUEST_AGE = dt.timedelta(minutes=5)


def request_timestamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def request_age_problem(timestamp: str, now: dt.datetime) -> str | None:
    """Why a request stamped ``timestamp`` is too old or from the future (None: it is fresh)."""
    try:
        stamped = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return f"timestamp {timestamp!r} is not YYYY-MM-DDTHH:MM:SSZ"
    skew = abs((now - stamped).total_seconds())
    if skew > MAX_REQUEST_AGE.total_seconds():
        return (
            f"timestamp {timestamp} is {skew:.0f} s away from the control plane's clock "
            f"(at most {MAX_REQUEST_AGE.total_seconds():.0f} s)"
        )
    return None


def sign_proof(key: PrivateKey, proof: Proof) -> str:
    """Base64 signature by ``key`` over everything ``proof`` names."""
    return base64.b64encode(sign_bytes(key, proof.signed_bytes())).decode()


def verify_proof(cert: x509.Certificate, signature: str, proof: Proof) -> bool:
    """True when ``signature`` was made by ``cert``'s key over ``proof``."""
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    return signature_is_valid(cert.public_key(), raw, proof.signed_bytes())


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    """A new device asks for a certificate for ``device_id``, proving it holds the claim."""

    device_id: str
    csr: str  # PEM, made by the device's own new key
    claim_certificate: str  # PEM of the claim certificate the device connected with
    signature: str  # sign_proof(claim key, self.proof(request id))
    timestamp: str  # request_timestamp() when the request was made
    hardware_serial: str = ""

    def proof(self, request_id: str) -> Proof:
        return Proof(PROVISION, request_id, request_id, self.device_id, self.timestamp, self.csr)


@dataclass(frozen=True, slots=True)
class RenewRequest:
    """An enrolled device asks for a fresh certificate, proving it holds its current one."""

    request_id: str
    csr: str
    certificate: str  # PEM of the device's current certificate
    signature: str  # sign_proof(current key, self.proof(device id))
    timestamp: str  # request_timestamp() when the request was made

    def proof(self, device_id: str) -> Proof:
        return Proof(RENEW, device_id, self.request_id, device_id, self.timestamp, self.csr)


@dataclass(frozen=True, slots=True)
class Reply:
    """The control plane's answer: ``issued`` with the chain, or ``refused`` with a reason."""

    request_id: str
    status: str  # issued | refused
    certificate: str = ""  # PEM chain (leaf first) when issued
    reason: str = ""  # a stable name when refused, e.g. id_taken, claim_exhausted
    message: str = ""  # what the device's operator should do about it

    @property
    def issued(self) -> bool:
        return self.status == "issued"


def encode(message: EnrollRequest | RenewRequest | Reply) -> bytes:
    return json.dumps(asdict(message), separators=(",", ":")).encode()


def _fields(
    payload: bytes, names: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, str]:
    try:
        body: Any = loads_bounded(payload, max_bytes=MAX_MESSAGE)
    except JsonRejected as exc:
        raise ProtocolError(f"message rejected: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message is not a JSON object")
    values: dict[str, str] = {}
    for name in (*names, *optional):
        value = body.get(name, "" if name in optional else None)
        if value is None:
            raise ProtocolError(f"missing field {name!r}", field=name)
        if not isinstance(value, str):
            raise ProtocolError(f"field {name!r} must be a string", field=name)
        values[name] = value
    unknown = sorted(set(body) - set(names) - set(optional))
    if unknown:
        raise ProtocolError(f"unknown field {unknown[0]!r}", field=unknown[0])
    return values


def decode_enroll_request(payload: bytes) -> EnrollRequest:
    values = _fields(
        payload,
        ("device_id", "csr", "claim_certificate", "signature", "timestamp"),
        ("hardware_serial",),
    )
    return EnrollRequest(**values)


def decode_renew_request(payload: bytes) -> RenewRequest:
    names = ("request_id", "csr", "certificate", "signature", "timestamp")
    return RenewRequest(**_fields(payload, names))


def decode_reply(payload: bytes) -> Reply:
    values = _fields(payload, ("request_id", "status"), ("certificate", "reason", "message"))
    if values["status"] not in ("issued", "refused"):
        raise ProtocolError(f"unknown status {values['status']!r}", field="status")
    return Reply(**values)


def leaf_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()

"""The control plane's answers to enrollment and renewal requests (transport-free).

:class:`CertificateRequests` takes a request as the bytes an MQTT message carried and returns
the :class:`~fleet.kernel.mqtt_api.Reply` to send back; :mod:`fleet.controlplane.mqtt_service` moves the
bytes. Every refusal has a stable reason, counted in ``fleet_enrollments_total{outcome}`` and
``fleet_renewals_total{outcome}``:

enrollment  ``bad_request``, ``bad_csr``, ``bad_signature``, ``not_a_claim``, ``claim_unknown``,
            ``claim_revoked``, ``claim_expired``, ``claim_exhausted``, ``id_not_allowed``,
            ``id_taken``
renewal     ``bad_request``, ``bad_csr``, ``bad_signature``, ``not_your_certificate``,
            ``unknown_certificate``, ``certificate_revoked``, ``certificate_expired``,
            ``certificate_not_yet_valid``, ``device_revoked``
both        ``stale_request`` (timestamp more than 5 minutes off), ``request_replayed`` (a
            request id that was answered with a certificate before)

A request id that was answered with a certificate gets the same answer again (QoS 1 may
deliver a request twice, and a device that lost the reply asks again): nothing is issued twice
for one request. Refusals are not remembered; a request is checked afresh each time.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry, Counter

from fleet.kernel.errors import CertificateError, FleetError, RequestRefused, UsageError
from fleet.kernel.identity import (
    CLAIM,
    DEVICE,
    DeviceIdentity,
    identity_from_certificate,
    validate_device_id,
)
from fleet.kernel.keys import key_type_of
from fleet.kernel.mqtt_api import (
    PROVISION,
    RENEW,
    EnrollRequest,
    ProtocolError,
    RenewRequest,
    Reply,
    decode_enroll_request,
    decode_renew_request,
    is_request_id,
    request_age_problem,
    verify_proof,
)
from fleet.store.claims import allows_id
from fleet.store.provisioning import provision_from_csr
from fleet.store.records import Enrollment, NewDevice
from fleet.store.workspace import Workspace

log = logging.getLogger("mtls_fleet.control_plane.requests")

ISSUED = "issued"
# Every reason an enrollment request can be refused for (the ``reason`` of a refused Reply).
ENROLLMENT_REFUSALS = (
    "bad_request",
    "bad_csr",
    "bad_signature",
    "not_a_claim",
    "claim_unknown",
    "claim_revoked",
    "claim_expired",
    "claim_exhausted",
    "id_not_allowed",
    "id_taken",
    "stale_request",
    "request_replayed",
    "internal_error",
)
_PEM = Encoding.PEM
_Request = TypeVar("_Request", EnrollRequest, RenewRequest)
_REMEMBERED_REPLIES = 20_000


class CertificateRequests:
    """Checks and answers requests for one workspace; safe to call from several threads."""

    def __init__(self, workspace: Workspace, metrics: CollectorRegistry | None = None) -> None:
        self.workspace = workspace
        self._lock = threading.Lock()
        self._replies: OrderedDict[tuple[str, str, str], Reply] = OrderedDict()
        self.enrollments = Counter(
            "fleet_enrollments",
            "Enrollment requests by outcome (issued, or the reason for refusing)",
            ["outcome"],
            registry=metrics,
        )
        self.renewals = Counter(
            "fleet_renewals",
            "Renewal requests by outcome (issued, or the reason for refusing)",
            ["outcome"],
            registry=metrics,
        )

    # -- entry points -----------------------------------------------------------------------

    def enroll(self, request_id: str, payload: bytes, *, now: dt.datetime | None = None) -> Reply:
        """Answer a request published on ``$fleet/provision/<request_id>/request``."""
        return self._answer(PROVISION, request_id, request_id, payload, now, self._enroll)

    def renew(self, device_id: str, payload: bytes, *, now: dt.datetime | None = None) -> Reply:
        """Answer a request published on ``$fleet/renew/<device_id>/request``."""
        try:
            request_id = decode_renew_request(payload).request_id
        except ProtocolError:
            request_id = ""
        return self._answer(RENEW, device_id, request_id, payload, now, self._renew)

    def _answer(
        self,
        kind: str,
        subject: str,
        request_id: str,
        payload: bytes,
        now: dt.datetime | None,
        handle: Callable[[str, bytes, dt.datetime], Reply],
    ) -> Reply:
        key = (kind, subject, request_id)
        with self._lock:  # one request at a time: the registry checks and writes stay ordered
            remembered = self._replies.get(key)
            if remembered is not None and request_id:
                return remembered
            try:
                reply = handle(subject, payload, now or dt.datetime.now(dt.UTC))
            except RequestRefused as exc:
                reply = Reply(request_id, "refused", reason=exc.reason, message=str(exc))
            except Exception as exc:  # never leave a device waiting on a crash of ours
                log.exception("%s request %s failed", kind, request_id)
                reply = Reply(request_id, "refused", reason="internal_error", message=str(exc))
            counter = self.enrollments if kind == PROVISION else self.renewals
            counter.labels(ISSUED if reply.issued else reply.reason).inc()
            if request_id and reply.issued:
                self._replies[key] = reply
                while len(self._replies) > _REMEMBERED_REPLIES:
                    self._replies.popitem(last=False)
            return reply

    # -- enrollment -------------------------------------------------------------------------

    def _enroll(self, request_id: str, payload: bytes, now: dt.datetime) -> Reply:
        if not is_request_id(request_id):
            raise RequestRefused("bad_request", f"request id {request_id!r} is malformed")
        request = _decoded(decode_enroll_request, payload)
        claim_cert = self._trusted_certificate(request.claim_certificate, "claim_certificate")
        identity = _identity(claim_cert)
        if identity.role != CLAIM:
            raise RequestRefused("not_a_claim", "enrollment needs a claim certificate")
        claim = self.workspace.registry.claim_by_serial(claim_cert.serial_number)
        if claim is None or claim.name != identity.device_id:
            raise RequestRefused(
                "claim_unknown", f"claim {identity.device_id!r} is not recorded in the registry"
            )
        refusal = claim.refusal(now)
        if refusal is not None:
            raise RequestRefused(*refusal)
        if not verify_proof(claim_cert, request.signature, request.proof(request_id)):
            raise RequestRefused("bad_signature", "the signature is not the claim key's")
        _check_fresh(request.timestamp, now)
        self._check_not_seen(PROVISION, request_id)
        csr = _csr(request)
        try:
            validate_device_id(request.device_id)
        except UsageError as exc:
            raise RequestRefused("bad_request", f"field 'device_id': {exc}") from exc
        if not allows_id(claim, request.device_id):
            raise RequestRefused(
                "id_not_allowed",
                f"claim {claim.name!r} only enrolls ids matching {claim.allow_ids!r}",
            )
        cert = provision_from_csr(
            self.workspace,
            csr.public_bytes(_PEM),
            device_id=request.device_id,
            tier=claim.tier,
            env=claim.env,
            valid_for=claim.device_valid_for,
            now=now,
            enrollment=Enrollment(
                request.device_id, claim.name, request.hardware_serial, request_id, now
            ),
        )
        log.info("enrolled %s through claim %s", request.device_id, claim.name)
        return Reply(request_id, ISSUED, certificate=self.workspace.ca.chain_pem(cert).decode())

    # -- renewal ----------------------------------------------------------------------------

    def _renew(self, device_id: str, payload: bytes, now: dt.datetime) -> Reply:
        request = _decoded(decode_renew_request, payload)
        if not is_request_id(request.request_id):
            raise RequestRefused("bad_request", "field 'request_id': 8-64 of A-Z a-z 0-9 _ -")
        current = self._trusted_certificate(request.certificate, "certificate")
        identity = _identity(current)
        if identity.role != DEVICE or identity.device_id != device_id:
            raise RequestRefused(
                "not_your_certificate", f"the certificate is not device {device_id!r}'s"
            )
        registry = self.workspace.registry
        status = registry.certificate_status(current.serial_number)
        if status is None:
            raise RequestRefused("unknown_certificate", "the fleet never issued this certificate")
        if status[0] == "revoked":
            raise RequestRefused("certificate_revoked", "the certificate was revoked")
        if current.not_valid_after_utc <= now:
            raise RequestRefused("certificate_expired", "the certificate has expired")
        if current.not_valid_before_utc > now:
            raise RequestRefused(
                "certificate_not_yet_valid",
                f"the certificate is valid only from {current.not_valid_before_utc.isoformat()}",
            )
        if not verify_proof(current, request.signature, request.proof(device_id)):
            raise RequestRefused("bad_signature", "the signature is not the certificate key's")
        _check_fresh(request.timestamp, now)
        self._check_not_seen(RENEW, request.request_id)
        csr = _csr(request)
        record = registry.get(device_id)
        if record.status == "revoked":
            raise RequestRefused("device_revoked", f"device {device_id!r} is revoked")
        # A renewal keeps the lifetime of the certificate it replaces: one-day certificates
        # stay one-day certificates.
        lifetime = current.not_valid_after_utc - current.not_valid_before_utc
        start = now.replace(microsecond=0)
        cert = self.workspace.ca.sign_csr(
            csr,
            DeviceIdentity(device_id, record.tier, record.env, identity.trust_domain),
            not_before=start,
            not_after=start + lifetime,
        )
        registry.renew(
            NewDevice(
                device_id=device_id,
                serial=cert.serial_number,
                tier=record.tier,
                env=record.env,
                key_type=key_type_of(csr.public_key()).value,
                key_source="csr",
                not_before=start,
                not_after=start + lifetime,
            ),
            now=now,
            request_id=request.request_id,
        )
        log.info("renewed %s until %s", device_id, start + lifetime)
        return Reply(
            request.request_id, ISSUED, certificate=self.workspace.ca.chain_pem(cert).decode()
        )

    # -- checks -----------------------------------------------------------------------------

    def _check_not_seen(self, kind: str, request_id: str) -> None:
        """Each request id is answered with a certificate once (the registry keeps them, so a
        restart forgets nothing); an exact redelivery gets the remembered answer before this."""
        if self.workspace.registry.request_seen(kind, request_id):
            raise RequestRefused("request_replayed", f"request {request_id!r} was answered already")

    def _trusted_certificate(self, pem: str, field: str) -> x509.Certificate:
        """The first certificate of ``pem``, if one of the fleet's trusted issuers signed it."""
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError as exc:
            raise RequestRefused(
                "bad_request", f"field {field!r} is not a PEM certificate"
            ) from exc
        for ca in [self.workspace.ca, *self.workspace.previous_authorities()]:
            try:
                cert.verify_directly_issued_by(ca.issuing_cert)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return cert
        reason = "claim_unknown" if field == "claim_certificate" else "unknown_certificate"
        raise RequestRefused(reason, f"field {field!r}: not issued by this fleet's CA")


def _check_fresh(timestamp: str, now: dt.datetime) -> None:
    problem = request_age_problem(timestamp, now)
    if problem is not None:
        raise RequestRefused("stale_request", problem)


def _decoded(decode: Callable[[bytes], _Request], payload: bytes) -> _Request:
    try:
        return decode(payload)
    except ProtocolError as exc:
        raise RequestRefused("bad_request", str(exc)) from exc


def _identity(cert: x509.Certificate) -> DeviceIdentity:
    try:
        return identity_from_certificate(cert)
    except CertificateError as exc:
        raise RequestRefused("bad_request", exc.reason) from exc


def _csr(request: EnrollRequest | RenewRequest) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(request.csr.encode())
    except ValueError as exc:
        raise RequestRefused("bad_csr", f"field 'csr' is not a PEM CSR ({exc})") from exc
    if not csr.is_signature_valid:
        raise RequestRefused("bad_csr", "the CSR's signature does not verify")
    try:
        key_type_of(csr.public_key())
    except FleetError as exc:
        raise RequestRefused("bad_csr", f"unsupported key in the CSR ({exc})") from exc
    return csr

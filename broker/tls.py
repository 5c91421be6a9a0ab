"""The broker's TLS context (pyOpenSSL) and the CRL it enforces.

pyOpenSSL rather than the standard ``ssl`` module because its verify callback hands us the
certificate that failed, so a rejection can name the device and its serial. A new context is
built for every new CRL: an OpenSSL store keeps every CRL it was given, so adding the second
one to the first context would leave the first in force.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL, crypto

from fleet.errors import FleetError
from fleet.workspace import WorkspacePaths

VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


class BrokerError(FleetError):
    """The broker cannot start or cannot load what it needs."""


@dataclass(frozen=True, slots=True)
class CrlState:
    """A CRL whose signature was checked, with what the broker needs from it."""

    crl: x509.CertificateRevocationList
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    revoked: frozenset[int]

    def is_stale(self, now: dt.datetime) -> bool:
        return now >= self.next_update


def load_crl(path: Path, issuers: list[x509.Certificate]) -> CrlState:
    """Read ``path`` and check it is signed by one of ``issuers``; raise :class:`BrokerError`."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        raise BrokerError(f"{path}: no CRL; run 'fleet crl publish' to create one") from None
    except ValueError as exc:
        raise BrokerError(f"{path}: not a PEM CRL ({exc})") from exc
    if not any(
        crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        for issuer in issuers
    ):
        raise BrokerError(f"{path}: CRL signature does not verify against the issuing CA; ignored")
    if crl.next_update_utc is None:
        raise BrokerError(f"{path}: CRL has no nextUpdate")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return CrlState(
        crl=crl,
        number=number,
        this_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        revoked=frozenset(entry.serial_number for entry in crl),
    )


def load_issuers(paths: WorkspacePaths) -> list[x509.Certificate]:
    """The CA certificates whose CRLs the broker accepts (the issuing intermediate)."""
    try:
        return x509.load_pem_x509_certificates(paths.issuing_cert.read_bytes())
    except (FileNotFoundError, ValueError) as exc:
        raise BrokerError(f"{paths.issuing_cert}: cannot load the issuing CA ({exc})") from exc


def build_server_context(
    paths: WorkspacePaths,
    *,
    crl: CrlState | None,
    check_crl: bool,
    verify_callback: VerifyCallback,
) -> SSL.Context:
    """A server context that *requires* a client certificate chaining to ``root.crt``.

    TLS 1.2 minimum (1.3 preferred by OpenSSL), clientAuth purpose checked by OpenSSL on the
    server side, the leaf checked against ``crl`` when ``check_crl``.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    try:
        context.use_certificate_chain_file(str(paths.server_cert))
        context.use_privatekey_file(str(paths.server_key))
        context.check_privatekey()
        context.load_verify_locations(str(paths.root_cert))
        # The issuing intermediate is known too, so a device that presents only its leaf (as
        # many TLS stacks and `openssl s_client -cert` do) still chains up to the root.
        context.load_verify_locations(str(paths.issuing_cert))
        context.load_client_ca(str(paths.root_cert).encode())
    except SSL.Error as exc:
        raise BrokerError(
            f"cannot load the broker's certificate, key or trust anchor from {paths.root}: {exc}"
        ) from exc
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify_callback)
    context.set_session_id(b"mtls-fleet-broker")  # lets clients resume sessions (tickets)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle connections hold no 16 KB record buffers
    if check_crl and crl is not None:
        store = context.get_cert_store()
        assert store is not None
        store.add_crl(crl.crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    return context

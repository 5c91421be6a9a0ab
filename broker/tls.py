"""The broker's TLS context (pyOpenSSL) and the CRL it enforces.

pyOpenSSL rather than the standard ``ssl`` module because its verify callback hands us the
certificate that failed, so a rejection can name the device and its serial. A new context is
built for every new CRL: an OpenSSL store keeps every CRL it was given, so adding the second
one to the first context would leave the first in force.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL, crypto

from fleet.errors import FleetError
from fleet.files import replace_atomically
from fleet.revocation import PEM_CRL_BEGIN, split_pem_crls
from fleet.workspace import WorkspacePaths

VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


class BrokerError(FleetError):
    """The broker cannot start or cannot load what it needs."""


@dataclass(frozen=True, slots=True)
class CrlState:
    """The CRLs in force (one per trusted issuing CA), their signatures checked."""

    crls: tuple[x509.CertificateRevocationList, ...]
    number: int
    numbers: dict[str, int]  # issuer (RFC 4514) -> the CRL number of that issuer's CRL
    this_update: dt.datetime
    next_update: dt.datetime  # the earliest of them: stale as soon as one is
    revoked: frozenset[int]
    issuers: frozenset[x509.Name]  # whose certificates can be checked (others are refused)
    # key ids of the trusted issuing CAs the root's CRL revokes; whether a root CRL came at all
    # (then every link of a chain has a CRL and the whole chain is checked)
    revoked_issuer_keys: frozenset[bytes] = frozenset()
    has_root_crl: bool = False

    def is_stale(self, now: dt.datetime) -> bool:
        return now >= self.next_update


def load_crl(path: Path, issuers: list[x509.Certificate]) -> CrlState:
    """Read every CRL in ``path``; each must be signed by one of ``issuers`` (BrokerError)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BrokerError(f"{path}: no CRL; run 'fleet crl publish' to create one") from None
    return parse_crls(data, issuers, source=str(path))


def parse_crls(data: bytes, issuers: list[x509.Certificate], *, source: str) -> CrlState:
    """Every CRL in ``data`` (PEM, one or more; or one DER), each signed by one of ``issuers``."""
    if PEM_CRL_BEGIN in data:
        blocks = split_pem_crls(data)
        load = x509.load_pem_x509_crl
    else:
        blocks, load = [data], x509.load_der_x509_crl
    crls = []
    signers: list[x509.Certificate] = []
    for block in blocks:
        try:
            crl = load(block)
        except ValueError as exc:
            raise BrokerError(f"{source}: not a CRL ({exc})") from exc
        signer = next(
            (
                issuer
                for issuer in issuers
                if crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            ),
            None,
        )
        if signer is None:
            raise BrokerError(
                f"{source}: the CRL of {crl.issuer.rfc4514_string()} does not verify against a "
                "trusted issuing CA; ignored"
            )
        if crl.next_update_utc is None:
            raise BrokerError(f"{source}: CRL has no nextUpdate")
        crls.append(crl)
        signers.append(signer)
    root_revoked = {
        entry.serial_number
        for crl, signer in zip(crls, signers, strict=True)
        if signer.subject == signer.issuer  # self-issued: the root's own CRL
        for entry in crl
    }
    return CrlState(
        crls=tuple(crls),
        number=max(_crl_number(crl) for crl in crls),
        numbers={crl.issuer.rfc4514_string(): _crl_number(crl) for crl in crls},
        this_update=min(crl.last_update_utc for crl in crls),
        next_update=min(crl.next_update_utc for crl in crls if crl.next_update_utc),
        revoked=frozenset(entry.serial_number for crl in crls for entry in crl),
        issuers=frozenset(crl.issuer for crl in crls),
        revoked_issuer_keys=frozenset(
            _key_id(issuer) for issuer in issuers if issuer.serial_number in root_revoked
        ),
        has_root_crl=any(signer.subject == signer.issuer for signer in signers),
    )


def _key_id(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def authority_key_id(cert: x509.Certificate) -> bytes | None:
    """The key identifier ``cert`` names its issuer by (None without the extension)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier


class CrlHistory:
    """The highest CRL number this workspace's brokers enforced, per issuer, kept across
    restarts in ``DIR/broker/crl-seen.json``: a broker never goes back to an older CRL (an old
    backup restored, a replayed file), even a genuinely signed one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text())
            self._seen = {str(k): int(v) for k, v in loaded.items()}
        except FileNotFoundError:
            self._seen = {}
        except (ValueError, TypeError, AttributeError) as exc:
            raise BrokerError(
                f"{path}: unreadable ({exc}); remove it only if you trust the CRL on disk"
            ) from exc

    def older_than_seen(self, crl: CrlState) -> str | None:
        """Why ``crl`` goes back in time (None: it does not)."""
        for issuer, number in crl.numbers.items():
            seen = self._seen.get(issuer, 0)
            if number < seen:
                return f"CRL #{number} of {issuer} is older than #{seen}, already enforced"
        return None

    def record(self, crl: CrlState) -> None:
        changed = False
        for issuer, number in crl.numbers.items():
            if number > self._seen.get(issuer, 0):
                self._seen[issuer] = number
                changed = True
        if changed:
            replace_atomically(self.path, json.dumps(self._seen, indent=1).encode())


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def issuer_files(paths: WorkspacePaths) -> list[Path]:
    """The trusted issuing CAs: the current one, then those a rotation replaced."""
    return paths.trusted_issuer_certs()


def load_retired_key_ids(paths: WorkspacePaths) -> frozenset[bytes]:
    """Subject key identifiers of the issuing CAs retired by ``fleet ca retire``."""
    key_ids = set()
    for path in sorted(paths.retired_issuers_dir.glob("*.crt")):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except (OSError, ValueError, x509.ExtensionNotFound):
            continue
        key_ids.add(ski.value.digest)
    return frozenset(key_ids)


def load_issuers(paths: WorkspacePaths) -> list[x509.Certificate]:
    """The CA certificates whose CRLs the broker accepts: the trusted issuing intermediates,
    and the root (its CRL lists the issuing CAs it revoked)."""
    issuers = []
    for path in [*issuer_files(paths), paths.root_cert]:
        try:
            issuers += x509.load_pem_x509_certificates(path.read_bytes())
        except (FileNotFoundError, ValueError) as exc:
            raise BrokerError(f"{path}: cannot load the issuing CA ({exc})") from exc
    return issuers


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
        for issuer in issuer_files(paths):
            context.load_verify_locations(str(issuer))
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
        for each in crl.crls:
            store.add_crl(each)
        # the whole chain when the root's CRL is there (an issuing CA it revoked is refused),
        # the leaf only for a CRL file published before the root had one
        flags = crypto.X509StoreFlags.CRL_CHECK  # CRL_CHECK_ALL extends it, never alone
        if crl.has_root_crl:
            flags |= crypto.X509StoreFlags.CRL_CHECK_ALL
        store.set_flags(flags)
    return context

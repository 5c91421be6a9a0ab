"""The one place that builds TLS contexts, client and server, for every part of the fleet.

Clients are strict about the server, as the broker is strict about the device: only the
fleet's root as trust anchor, hostname checked, TLS >= 1.2. Servers require a client
certificate chaining to the root: :func:`broker_context` (pyOpenSSL, the MQTT broker) and
:func:`mtls_server_context` (Python ``ssl``, the admin API).

Simulated devices use :func:`device_tls` (pyOpenSSL): every device of a process that trusts the
same root and presents a chain from the same issuing CA shares one ``SSL.Context`` (the trust
store, parsed once), and each connection carries its own certificate and key. Loading a
device's credentials this way costs ~0.25 ms, against ~1.6-1.8 ms for a Python
``ssl.SSLContext`` of its own (OpenSSL 3.0's decoders parse the root, the chain and the key
again for every device): that was the largest single cost of a swarm's ramp (py-spy: 40% of
a shard's busy time). :func:`device_tls_context` (Python ``ssl``) remains for clients built on
paho's own TLS (the control plane), the admin client and the handshake bench.

pyOpenSSL for the broker because its verify callback hands us the certificate that failed, so
a rejection can name the device and its serial.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

from fleet.kernel.errors import CertificateError, FleetError
from fleet.kernel.identity_files import recover_identity


def device_tls_context(
    trust_anchor: Path,
    cert: Path,
    key: Path,
    *,
    device_id: str,
    check_hostname: bool = True,
    keylog_file: str | None = None,
    present_certificate: bool = True,
) -> ssl.SSLContext:
    """A client context holding the device's chain and key.

    ``trust_anchor`` is the *only* CA trusted (no system store). ``SSLKEYLOGFILE`` (or
    ``keylog_file``) writes TLS secrets for Wireshark. Errors name the device and the reason.
    ``present_certificate=False`` leaves the chain out: a device that shows the broker nothing.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checks
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    try:
        context.load_verify_locations(cafile=str(trust_anchor))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot load trust anchor {trust_anchor}: {exc}",
            device_id=device_id,
            code="bad_trust_anchor",
        ) from exc
    keylog = keylog_file or os.environ.get("SSLKEYLOGFILE")
    if keylog:
        context.keylog_filename = keylog
    if not present_certificate:
        return context
    recover_identity(cert, key)  # a renewal that a crash interrupted
    for path in (cert, key):
        if not path.is_file():
            raise CertificateError(f"missing {path}", device_id=device_id, code="missing_file")
    try:
        context.load_cert_chain(str(cert), str(key))
    except PermissionError as exc:
        raise CertificateError(
            f"cannot read {exc.filename}: permission denied",
            device_id=device_id,
            code="permission_denied",
        ) from exc
    except ssl.SSLError as exc:
        mismatch = "KEY_VALUES_MISMATCH" in str(exc)
        reason = "the key does not match the certificate" if mismatch else str(exc)
        raise CertificateError(
            f"unusable certificate or key ({reason})",
            device_id=device_id,
            code="key_mismatch" if mismatch else "unusable_certificate",
        ) from exc
    return context


TlsKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)  # the key types OpenSSL's TLS stack takes through pyOpenSSL


@dataclass(frozen=True, slots=True, eq=False)
class DeviceTls:
    """What a device connects with: the shared context (trust anchor, issuing chain, TLS
    settings) and its own certificate and key (None: it presents nothing)."""

    context: SSL.Context
    certificate: x509.Certificate | None
    key: TlsKey | None
    check_hostname: bool = True


_shared_contexts: dict[tuple[bytes, tuple[bytes, ...], bool, str | None], SSL.Context] = {}
_shared_lock = threading.Lock()  # credentials are loaded in worker threads too


def device_tls(
    trust_anchor: Path,
    cert: Path,
    key: Path,
    *,
    device_id: str,
    check_hostname: bool = True,
    keylog_file: str | None = None,
    present_certificate: bool = True,
) -> DeviceTls:
    """The device's credentials over a context shared with every device of the same trust
    anchor and issuing chain; the same checks and errors as :func:`device_tls_context`."""
    try:
        anchor = trust_anchor.read_bytes()
    except OSError as exc:
        raise CertificateError(
            f"cannot load trust anchor {trust_anchor}: {exc.strerror}",
            device_id=device_id,
            code="bad_trust_anchor",
        ) from exc
    keylog = keylog_file or os.environ.get("SSLKEYLOGFILE")
    if not present_certificate:
        context = _shared_context(anchor, (), check_hostname, keylog, trust_anchor, device_id)
        return DeviceTls(context, None, None, check_hostname)
    certificate, chain, private_key = _load_identity(cert, key, device_id)
    context = _shared_context(anchor, chain, check_hostname, keylog, trust_anchor, device_id)
    return DeviceTls(context, certificate, private_key, check_hostname)


def _load_identity(
    cert: Path, key: Path, device_id: str
) -> tuple[x509.Certificate, tuple[bytes, ...], TlsKey]:
    recover_identity(cert, key)  # a renewal that a crash interrupted
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    except FileNotFoundError as exc:
        raise CertificateError(
            f"missing {exc.filename}", device_id=device_id, code="missing_file"
        ) from exc
    except PermissionError as exc:
        raise CertificateError(
            f"cannot read {exc.filename}: permission denied",
            device_id=device_id,
            code="permission_denied",
        ) from exc
    try:
        certificates = x509.load_pem_x509_certificates(cert_pem)
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"unusable certificate or key ({exc})", device_id=device_id, code="unusable_certificate"
        ) from exc
    if not isinstance(private_key, TlsKey):
        raise CertificateError(
            f"unusable certificate or key ({type(private_key).__name__} is not a TLS key type)",
            device_id=device_id,
            code="unusable_certificate",
        )
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    leaf = certificates[0]
    if private_key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(
        der, spki
    ):
        raise CertificateError(
            "unusable certificate or key (the key does not match the certificate)",
            device_id=device_id,
            code="key_mismatch",
        )
    chain = tuple(c.public_bytes(der) for c in certificates[1:])
    return leaf, chain, private_key


def _shared_context(
    anchor: bytes,
    chain: tuple[bytes, ...],
    check_hostname: bool,
    keylog: str | None,
    anchor_path: Path,
    device_id: str,
) -> SSL.Context:
    key = (anchor, chain, check_hostname, keylog)
    with _shared_lock:
        context = _shared_contexts.get(key)
        if context is None:
            context = _new_context(anchor, chain, keylog, anchor_path, device_id)
            if len(_shared_contexts) >= 64:  # a bound, should something churn trust anchors
                _shared_contexts.clear()
            _shared_contexts[key] = context
    return context


def _new_context(
    anchor: bytes, chain: tuple[bytes, ...], keylog: str | None, anchor_path: Path, device_id: str
) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle connections hold no record buffers
    # Classical ECDHE, as the devices offered with Python's ssl (OpenSSL 3.0): OpenSSL 4.0 would
    # offer the hybrid X25519MLKEM768 first, which costs a broker on OpenSSL 4.0 ~5 KB more per
    # connection (measured: 52 against 47 KB). P-256 is the group every TLS 1.3 peer must
    # support (RFC 8446, 9.1); pyOpenSSL has no call for a list of groups.
    context.set_tmp_ecdh(ec.SECP256R1())
    try:
        store = context.get_cert_store()
        assert store is not None
        for root in x509.load_pem_x509_certificates(anchor):
            store.add_cert(crypto.X509.from_cryptography(root))
    except (ValueError, SSL.Error, crypto.Error) as exc:
        raise CertificateError(
            f"cannot load trust anchor {anchor_path}: {exc}",
            device_id=device_id,
            code="bad_trust_anchor",
        ) from exc
    context.set_verify(SSL.VERIFY_PEER, _keep_openssl_verdict)
    for der in chain:  # sent after each connection's own certificate
        context.add_extra_chain_cert(x509.load_der_x509_certificate(der))
    if keylog:
        context.set_keylog_callback(_keylog_writer(keylog))
    return context


def _keep_openssl_verdict(
    connection: SSL.Connection, cert: object, errnum: int, depth: int, ok: int
) -> bool:
    return bool(ok)


def _keylog_writer(path: str) -> Callable[[SSL.Connection, bytes], None]:
    def write(connection: SSL.Connection, line: bytes) -> None:
        with open(path, "ab") as out:  # NSS key log format, as SSLKEYLOGFILE
            out.write(line + b"\n")

    return write


def spki_pin(certificate_der: bytes) -> str:
    """``sha256/BASE64`` of a certificate's SubjectPublicKeyInfo: the pin of its public key,
    which survives re-issuing the certificate with the same key (and only then)."""
    try:
        key = x509.load_der_x509_certificate(certificate_der).public_key()
    except ValueError:
        return "sha256/-"  # nothing presented, or nothing readable: matches no pin
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()


def parse_pin(text: str) -> str:
    """A ``sha256/BASE64`` pin (curl's ``--pinnedpubkey sha256//BASE64`` takes the same hash),
    checked: a SHA-256 digest, 32 bytes, in standard base64."""
    prefix, _, encoded = text.strip().partition("/")
    if len(encoded) == 45 and encoded.startswith("/"):  # curl's sha256//BASE64
        encoded = encoded[1:]
    try:
        digest = base64.b64decode(encoded, validate=True)
    except ValueError:
        digest = b""
    if prefix != "sha256" or len(digest) != 32:
        raise ValueError(
            f"invalid pin {text!r}: use sha256/BASE64 of the broker key's SubjectPublicKeyInfo "
            "(openssl x509 -in server.crt -pubkey -noout | openssl pkey -pubin -outform der | "
            "openssl dgst -sha256 -binary | base64)"
        )
    return "sha256/" + base64.b64encode(digest).decode()


VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


@dataclass(frozen=True, slots=True)
class ServerFiles:
    """What a server presents and trusts: its chain and key, the root, the issuing CAs."""

    cert: Path
    key: Path
    trust_anchor: Path
    issuers: tuple[Path, ...] = ()


def broker_context(
    files: ServerFiles,
    *,
    crls: tuple[x509.CertificateRevocationList, ...] = (),
    check_whole_chain: bool = False,
    verify_callback: VerifyCallback,
) -> SSL.Context:
    """A pyOpenSSL server context that *requires* a client certificate chaining to the root.

    TLS 1.2 minimum (1.3 preferred by OpenSSL), clientAuth purpose checked by OpenSSL on the
    server side; with ``crls`` the leaf is checked against them, and with
    ``check_whole_chain`` every link of the chain (the root's CRL revokes issuing CAs).
    Raises :class:`FleetError` naming the files when they cannot be loaded.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    try:
        context.use_certificate_chain_file(str(files.cert))
        context.use_privatekey_file(str(files.key))
        context.check_privatekey()
        context.load_verify_locations(str(files.trust_anchor))
        # The issuing intermediates are known too, so a device that presents only its leaf (as
        # many TLS stacks and `openssl s_client -cert` do) still chains up to the root.
        for issuer in files.issuers:
            context.load_verify_locations(str(issuer))
        context.load_client_ca(str(files.trust_anchor).encode())
    except SSL.Error as exc:
        raise FleetError(
            f"cannot load the server certificate {files.cert}, its key or the trust anchor "
            f"{files.trust_anchor}: {exc}"
        ) from exc
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify_callback)
    context.set_session_id(b"mtls-fleet-broker")  # lets clients resume sessions (tickets)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle connections hold no 16 KB record buffers
    if crls:
        store = context.get_cert_store()
        assert store is not None
        for each in crls:
            store.add_crl(each)
        flags = crypto.X509StoreFlags.CRL_CHECK  # CRL_CHECK_ALL extends it, never alone
        if check_whole_chain:
            flags |= crypto.X509StoreFlags.CRL_CHECK_ALL
        store.set_flags(flags)
    return context


def mtls_server_context(files: ServerFiles) -> ssl.SSLContext:
    """A Python ``ssl`` server context requiring a client certificate chaining to the root."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
        context.load_verify_locations(cafile=str(files.trust_anchor))
    except (OSError, ssl.SSLError) as exc:
        raise FleetError(
            f"cannot load the server certificate {files.cert}, its key or the trust anchor "
            f"{files.trust_anchor}: {exc}"
        ) from exc
    context.verify_mode = ssl.CERT_REQUIRED
    return context

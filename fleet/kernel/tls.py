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
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

from fleet.kernel.errors import CertificateError, FleetError, UsageError
from fleet.kernel.handshake_trace import HandshakeTracer
from fleet.kernel.identity_files import recover_identity
from fleet.kernel.keys import PrivateKey, key_type_of


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


@dataclass(frozen=True, slots=True, eq=False)
class DeviceTls:
    """What a device connects with: the shared context (trust anchor, issuing chain, TLS
    settings, groups) and its tracer, and its own certificate and key, parsed once into
    OpenSSL's objects (None: it presents nothing)."""

    context: SSL.Context
    certificate: crypto.X509 | None
    key: crypto.PKey | None
    check_hostname: bool = True
    tracer: HandshakeTracer | None = None
    groups: tuple[str, ...] = ()  # offered key-exchange groups; empty: P-256 only
    key_kind: str = "-"  # the key's type (ec-p256, ml-dsa-65 …), for messages

    def use_identity(self, connection: SSL.Connection) -> None:
        """Give ``connection`` this device's certificate and key (pyOpenSSL's own calls would
        convert them from ``cryptography`` objects again at every connection, and refuse
        ML-DSA keys)."""
        if self.certificate is None or self.key is None:
            return
        if not _lib.SSL_use_certificate(connection._ssl, self.certificate._x509):
            raise SSL.Error("SSL_use_certificate failed")
        if not _lib.SSL_use_PrivateKey(connection._ssl, self.key._pkey):
            raise SSL.Error("SSL_use_PrivateKey failed")


_ContextKey = tuple[bytes, tuple[bytes, ...], bool, str | None, tuple[str, ...], str | None]
_shared_contexts: dict[_ContextKey, tuple[SSL.Context, HandshakeTracer]] = {}
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
    groups: tuple[str, ...] = (),
    tls_version: str | None = None,
) -> DeviceTls:
    """The device's credentials over a context shared with every device of the same trust
    anchor, issuing chain, ``groups`` (key-exchange groups in order of preference, see
    :func:`parse_groups`; empty: P-256 only) and ``tls_version`` (``"1.2"`` or ``"1.3"`` only;
    None: 1.2 or later); the same checks and errors as :func:`device_tls_context`."""
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
        key_ = (anchor, (), check_hostname, keylog, groups, tls_version)
        context, tracer = _shared_context(key_, trust_anchor, device_id)
        return DeviceTls(context, None, None, check_hostname, tracer, groups)
    certificate, chain, private_key, kind = _load_identity(cert, key, device_id)
    context, tracer = _shared_context(
        (anchor, chain, check_hostname, keylog, groups, tls_version), trust_anchor, device_id
    )
    return DeviceTls(context, certificate, private_key, check_hostname, tracer, groups, kind)


def _load_identity(
    cert: Path, key: Path, device_id: str
) -> tuple[crypto.X509, tuple[bytes, ...], crypto.PKey, str]:
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
    if not isinstance(private_key, PrivateKey):
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
    pkcs8 = private_key.private_bytes(
        der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pkey = crypto.load_privatekey(crypto.FILETYPE_ASN1, pkcs8)
    try:
        kind = key_type_of(private_key).value
    except UsageError:
        kind = type(private_key).__name__
    return crypto.X509.from_cryptography(leaf), chain, pkey, kind


def _shared_context(
    key: _ContextKey, anchor_path: Path, device_id: str
) -> tuple[SSL.Context, HandshakeTracer]:
    with _shared_lock:
        shared = _shared_contexts.get(key)
        if shared is None:
            anchor, chain, _, keylog, groups, version = key
            context = _new_context(anchor, chain, keylog, groups, anchor_path, device_id)
            if version == "1.2":
                context.set_max_proto_version(SSL.TLS1_2_VERSION)
            elif version == "1.3":
                context.set_min_proto_version(SSL.TLS1_3_VERSION)
            tracer = HandshakeTracer()
            tracer.attach(context)
            shared = (context, tracer)
            if len(_shared_contexts) >= 64:  # a bound, should something churn trust anchors
                _shared_contexts.clear()
            _shared_contexts[key] = shared
    return shared


def _new_context(
    anchor: bytes,
    chain: tuple[bytes, ...],
    keylog: str | None,
    groups: tuple[str, ...],
    anchor_path: Path,
    device_id: str,
) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle connections hold no record buffers
    if groups:
        apply_groups(context, groups)
    else:
        # Classical ECDHE by default, as the devices offered with Python's ssl (OpenSSL 3.0):
        # OpenSSL 4.0 would offer the hybrid X25519MLKEM768 first, which costs a broker on
        # OpenSSL 4.0 ~5 KB more per connection (measured: 52 against 47 KB). P-256 is the group
        # every TLS 1.3 peer must support (RFC 8446, 9.1). ``groups`` chooses others.
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


# -- key-exchange groups ---------------------------------------------------------------------

# What OpenSSL 4.0 offers, as it reports a negotiated group (``get_group_name``, the IANA
# names): the hybrids (ML-KEM with a classical curve), ML-KEM alone, the classical curves and
# the finite-field groups. ``--groups`` takes these, any case, and P-256/P-384/P-521.
KNOWN_GROUPS = (
    "X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024",
    "MLKEM512", "MLKEM768", "MLKEM1024",
    "x25519", "x448", "secp256r1", "secp384r1", "secp521r1",
    "ffdhe2048", "ffdhe3072", "ffdhe4096",
)  # fmt: skip
_GROUP_ALIASES = {"p-256": "secp256r1", "p-384": "secp384r1", "p-521": "secp521r1",
                  "prime256v1": "secp256r1"}  # fmt: skip
_CANONICAL_GROUPS = {name.lower(): name for name in KNOWN_GROUPS}
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")
_MAX_GROUPS = 16


def canonical_group(name: str) -> str | None:
    """The name OpenSSL reports for the group ``name`` (``P-256`` → ``secp256r1``,
    ``X25519`` → ``x25519``); None when it is none of :data:`KNOWN_GROUPS`."""
    key = name.strip().lower()
    return _CANONICAL_GROUPS.get(_GROUP_ALIASES.get(key, key))


def parse_groups(text: str) -> tuple[str, ...]:
    """``X25519MLKEM768,X25519,P-256`` → the groups in order of preference, each checked
    against this OpenSSL (4.0: the same library the broker and the devices use)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise UsageError(
            f"no key-exchange group in {text!r}: name one or more, e.g. X25519MLKEM768"
        )
    if len(names) > _MAX_GROUPS:
        raise UsageError(f"{len(names)} key-exchange groups: at most {_MAX_GROUPS}")
    scratch = SSL.Context(SSL.TLS_CLIENT_METHOD)
    for name in names:
        if not _GROUP_NAME.fullmatch(name) or not _lib.SSL_CTX_set1_curves_list(
            scratch._context, name.encode()
        ):
            _lib.ERR_clear_error()
            raise UsageError(
                f"unknown key-exchange group {name[:40]!r}: OpenSSL 4.0 offers "
                + ", ".join(KNOWN_GROUPS)
            )
    if len({canonical_group(name) or name for name in names}) != len(names):
        raise UsageError(f"a key-exchange group is named twice in {text!r}")
    return names


def apply_groups(context: SSL.Context, groups: tuple[str, ...]) -> None:
    """Offer (a client) or accept (a server) exactly ``groups``, in that order of preference.

    pyOpenSSL has no call for it; OpenSSL's ``SSL_CTX_set1_groups_list`` is in cryptography's
    bindings under its older name, ``SSL_CTX_set1_curves_list``."""
    if not _lib.SSL_CTX_set1_curves_list(context._context, ":".join(groups).encode()):
        _lib.ERR_clear_error()
        raise UsageError(f"OpenSSL refused the key-exchange groups {', '.join(groups)}")


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
    groups: tuple[str, ...] = (),
    tracer: HandshakeTracer | None = None,
) -> SSL.Context:
    """A pyOpenSSL server context that *requires* a client certificate chaining to the root.

    TLS 1.2 minimum (1.3 preferred by OpenSSL), clientAuth purpose checked by OpenSSL on the
    server side; with ``crls`` the leaf is checked against them, and with
    ``check_whole_chain`` every link of the chain (the root's CRL revokes issuing CAs);
    ``groups`` the key-exchange groups accepted (empty: OpenSSL 4.0's default list, the hybrid
    X25519MLKEM768 first); ``tracer`` sees each handshake's messages. Raises :class:`FleetError` naming the files when they cannot be loaded.
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
    if groups:
        apply_groups(context, groups)
    if tracer is not None:
        tracer.attach(context)
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

"""What a TLS handshake negotiated and cost on the wire, read from OpenSSL's message callback.

pyOpenSSL reports the key-exchange group (``Connection.get_group_name``) but neither the
signature scheme the peer signed its handshake with nor the bytes the handshake took. OpenSSL
shows both to a *message callback* (``SSL_CTX_set_msg_callback``, in cryptography's bindings):
every record header (5 bytes, whose last two give the record's length) and every handshake
message in clear, so the peer's ``CertificateVerify`` (TLS 1.3 and 1.2) or, in TLS 1.2, its
``ServerKeyExchange`` names the scheme (RFC 8446 4.2.3; ML-DSA: draft-ietf-tls-mldsa).

Only connections being traced pay more than a dictionary lookup per record: a connection is
traced from :meth:`HandshakeTracer.track` until :meth:`HandshakeTracer.finish`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

# IANA TLS SignatureScheme registry: the schemes OpenSSL 4.0 can negotiate.
SIGNATURE_SCHEMES: dict[int, str] = {
    0x0401: "rsa_pkcs1_sha256",
    0x0501: "rsa_pkcs1_sha384",
    0x0601: "rsa_pkcs1_sha512",
    0x0403: "ecdsa_secp256r1_sha256",
    0x0503: "ecdsa_secp384r1_sha384",
    0x0603: "ecdsa_secp521r1_sha512",
    0x0804: "rsa_pss_rsae_sha256",
    0x0805: "rsa_pss_rsae_sha384",
    0x0806: "rsa_pss_rsae_sha512",
    0x0807: "ed25519",
    0x0808: "ed448",
    0x0809: "rsa_pss_pss_sha256",
    0x080A: "rsa_pss_pss_sha384",
    0x080B: "rsa_pss_pss_sha512",
    0x081A: "ecdsa_brainpoolP256r1tls13_sha256",
    0x081B: "ecdsa_brainpoolP384r1tls13_sha384",
    0x081C: "ecdsa_brainpoolP512r1tls13_sha512",
    0x0904: "mldsa44",
    0x0905: "mldsa65",
    0x0906: "mldsa87",
}

_RECORD_HEADER = 256  # SSL3_RT_HEADER: the callback sees each record's 5-byte header
_HANDSHAKE = 22
_SERVER_HELLO = 2
_CERTIFICATE = 11
_SERVER_KEY_EXCHANGE = 12
_CERTIFICATE_VERIFY = 15


def signature_scheme_name(code: int) -> str:
    """The IANA name of a TLS SignatureScheme code (``0x0905`` → ``mldsa65``)."""
    return SIGNATURE_SCHEMES.get(code, f"0x{code:04x}")


@dataclass(slots=True)
class HandshakeFacts:
    """One connection's handshake: bytes of TLS records each way (headers included; TCP/IP's
    own headers not), and the scheme the peer signed with (None until seen)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    peer_signature: str | None = None
    server_hello_seen: bool = False  # a client's: the server chose a group and a cipher
    sent_empty_certificate: bool = False  # asked for a certificate, and sent none

    @property
    def bytes_on_wire(self) -> int:
        return self.bytes_sent + self.bytes_received


class HandshakeTracer:
    """OpenSSL's message callback for the contexts it is :meth:`attach`-ed to (keep the tracer
    as long as they live: it holds the callback)."""

    def __init__(self) -> None:
        self._traced: dict[int, HandshakeFacts] = {}
        self._lock = threading.Lock()
        self._callback = _ffi.callback(
            "void(int, int, int, void *, size_t, SSL *, void *)", self._on_message
        )

    def attach(self, context: SSL.Context) -> None:
        """Trace the connections of ``context`` that :meth:`track` names."""
        _lib.SSL_CTX_set_msg_callback(context._context, self._callback)

    def track(self, connection: SSL.Connection) -> HandshakeFacts:
        """Start counting ``connection`` (before its handshake); the facts fill in as it goes."""
        facts = HandshakeFacts()
        with self._lock:
            self._traced[_address(connection)] = facts
        return facts

    def finish(self, connection: SSL.Connection) -> HandshakeFacts | None:
        """Stop tracing ``connection``; what was seen, or None if it was not traced."""
        with self._lock:
            return self._traced.pop(_address(connection), None)

    def _on_message(
        self, write_p: int, version: int, content_type: int, buf: object, size: int,
        ssl: object, arg: object,
    ) -> None:  # fmt: skip
        if not self._traced or (content_type != _RECORD_HEADER and content_type != _HANDSHAKE):
            return  # the steady state: sessions' records, no handshake in progress
        facts = self._traced.get(int(_ffi.cast("uintptr_t", ssl)))
        if facts is None:
            return
        if content_type == _RECORD_HEADER and size == 5:
            header = bytes(_ffi.buffer(buf, 5))
            length = 5 + int.from_bytes(header[3:5], "big")
            if write_p:
                facts.bytes_sent += length
            else:
                facts.bytes_received += length
        elif content_type == _HANDSHAKE and size >= 4:
            message = bytes(_ffi.buffer(buf, min(size, 1024)))  # what is read is in the first KB
            if write_p:
                if message[0] == _CERTIFICATE and _empty_certificate_list(message, version):
                    facts.sent_empty_certificate = True
                return
            if message[0] == _SERVER_HELLO:
                facts.server_hello_seen = True
            scheme = _signature_scheme(message)
            if scheme is not None:
                facts.peer_signature = signature_scheme_name(scheme)


def _address(connection: SSL.Connection) -> int:
    return int(_ffi.cast("uintptr_t", connection._ssl))


_TLS1_3 = 0x0304


def _empty_certificate_list(message: bytes, version: int) -> bool:
    """A Certificate message without certificates (TLS 1.3: after its request context)."""
    offset = 4
    if version == _TLS1_3:
        if len(message) < 5:
            return False
        offset += 1 + message[4]
    return message[offset : offset + 3] == b"\x00\x00\x00"


def _signature_scheme(message: bytes) -> int | None:
    """The SignatureScheme of a received CertificateVerify, or of a TLS 1.2 ECDHE
    ServerKeyExchange (curve type, named curve, point, then the scheme); None otherwise."""
    kind = message[0]
    if kind == _CERTIFICATE_VERIFY and len(message) >= 6:
        return int.from_bytes(message[4:6], "big")
    if kind == _SERVER_KEY_EXCHANGE and len(message) > 8 and message[4] == 3:  # named_curve
        point_end = 8 + message[7]
        if len(message) >= point_end + 2:
            return int.from_bytes(message[point_end : point_end + 2], "big")
    return None

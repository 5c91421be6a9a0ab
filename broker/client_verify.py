"""The broker's verify callback: how OpenSSL's verdict on a client certificate is kept, and
refined, so that every refusal gets its own reason and alert (revoked, expired, unknown CA,
wrong purpose, a stale CRL under the revocation policy …)."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto

from broker.connection import PeerConnection
from broker.outcomes import UNABLE_TO_GET_CRL as _UNABLE_TO_GET_CRL

_INVALID_PURPOSE = 26  # X509_V_ERR_INVALID_PURPOSE
_REVOKED = 23  # X509_V_ERR_CERT_REVOKED
_CRL_PAST_NEXT_UPDATE = (11, 12)  # X509_V_ERR_CRL_NOT_YET_VALID, X509_V_ERR_CRL_HAS_EXPIRED


def _allows_client_auth(cert: crypto.X509) -> bool:
    """Whether the leaf has an EKU extension that lists clientAuth (required, not implied)."""
    try:
        usage = cert.to_cryptography().extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except (x509.ExtensionNotFound, ValueError):
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage.value


def verify_client(
    connection: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """Remember the leaf and the first error for the logs; the verdict stays a failure.

    OpenSSL stops at the first error it is told about, often at the intermediate (an unknown
    CA), before the leaf is ever shown. So an error above the leaf is noted and verification
    allowed to reach the leaf, where the failure is returned. The connection also refuses any
    handshake that noted an error, should OpenSSL finish without asking about the leaf.
    """
    peer = connection.get_app_data()
    if not isinstance(peer, PeerConnection):
        return bool(ok)
    if not ok and errnum in _CRL_PAST_NEXT_UPDATE and peer.broker.forgives_stale_crl:
        return True  # fail-open: the stale CRL still revokes what it lists
    if not ok and errnum == _REVOKED and depth > 0:
        # its issuing CA is on the root's CRL: refused at once, with the certificate_revoked alert
        peer.verify_code, peer.issuer_revoked = errnum, True
        return False
    if depth == 0:
        peer.leaf = cert
        if ok and peer.verify_code is None and not _allows_client_auth(cert):
            # OpenSSL's purpose check lets a leaf without any EKU pass as every purpose.
            peer.verify_code = _INVALID_PURPOSE
            return False
    only_crl_missing = peer.verify_code == _UNABLE_TO_GET_CRL
    if not ok and (peer.verify_code is None or only_crl_missing):
        peer.verify_code = errnum
    if (
        not ok
        and errnum == _UNABLE_TO_GET_CRL
        and depth == 0
        and peer.verify_code == errnum
        and not peer.broker.issued_by_retired_ca(cert)
    ):
        # OpenSSL checks revocation before signatures and dates: look on, so that a leaf from
        # an expired intermediate is refused as expired, not as "no CRL for its issuer".
        # (A retired issuer is refused at once: looking on would end in an internal_error alert.)
        return True
    if depth > 0:
        if not ok and only_crl_missing:
            return False  # the better reason, with its own alert
        return True if peer.verify_code is not None else bool(ok)
    return peer.verify_code is None and bool(ok)

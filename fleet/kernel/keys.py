"""Private key types the fleet issues, and their generation, signatures and serialization.

Classical (ECDSA, RSA), Ed25519 and the post-quantum ML-DSA (FIPS 204) of ``cryptography`` 50
(OpenSSL 4.0): any of them for a CA, a broker or a device, mixed in one chain or not.
"""

from __future__ import annotations

import enum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, padding, rsa

from fleet.kernel.errors import UsageError

PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | mldsa.MLDSA44PrivateKey
    | mldsa.MLDSA65PrivateKey
    | mldsa.MLDSA87PrivateKey
)
PublicKey = (
    ec.EllipticCurvePublicKey
    | rsa.RSAPublicKey
    | ed25519.Ed25519PublicKey
    | mldsa.MLDSA44PublicKey
    | mldsa.MLDSA65PublicKey
    | mldsa.MLDSA87PublicKey
)


class KeyType(enum.StrEnum):
    """The key algorithms ``--key-type`` offers; ECDSA P-256 is the default."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"
    ED25519 = "ed25519"
    ML_DSA_44 = "ml-dsa-44"
    ML_DSA_65 = "ml-dsa-65"
    ML_DSA_87 = "ml-dsa-87"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        try:
            return cls(text.strip().lower())
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise UsageError(f"unknown key type {text!r}: choose one of {choices}") from None

    @property
    def is_rsa(self) -> bool:
        return self in (KeyType.RSA2048, KeyType.RSA3072)

    @property
    def is_post_quantum(self) -> bool:
        """ML-DSA: a signature a quantum computer is not known to forge."""
        return self in (KeyType.ML_DSA_44, KeyType.ML_DSA_65, KeyType.ML_DSA_87)


def generate_private_key(key_type: KeyType) -> PrivateKey:
    """Generate a fresh private key of ``key_type``."""
    match key_type:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case KeyType.RSA3072:
            return rsa.generate_private_key(public_exponent=65537, key_size=3072)
        case KeyType.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
        case KeyType.ML_DSA_44:
            return mldsa.MLDSA44PrivateKey.generate()
        case KeyType.ML_DSA_65:
            return mldsa.MLDSA65PrivateKey.generate()
        case KeyType.ML_DSA_87:
            return mldsa.MLDSA87PrivateKey.generate()
    raise AssertionError(key_type)  # pragma: no cover - the match is exhaustive


_BY_CLASS: tuple[tuple[type, KeyType], ...] = (
    (ed25519.Ed25519PrivateKey, KeyType.ED25519),
    (ed25519.Ed25519PublicKey, KeyType.ED25519),
    (mldsa.MLDSA44PrivateKey, KeyType.ML_DSA_44),
    (mldsa.MLDSA44PublicKey, KeyType.ML_DSA_44),
    (mldsa.MLDSA65PrivateKey, KeyType.ML_DSA_65),
    (mldsa.MLDSA65PublicKey, KeyType.ML_DSA_65),
    (mldsa.MLDSA87PrivateKey, KeyType.ML_DSA_87),
    (mldsa.MLDSA87PublicKey, KeyType.ML_DSA_87),
)


def key_type_of(key: object) -> KeyType:
    """The :class:`KeyType` of an existing key; raises :class:`UsageError` for other kinds."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyType.EC_P256
        if isinstance(key.curve, ec.SECP384R1):
            return KeyType.EC_P384
    elif isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size == 2048:
            return KeyType.RSA2048
        if key.key_size == 3072:
            return KeyType.RSA3072
    for kind, key_type in _BY_CLASS:
        if isinstance(key, kind):
            return key_type
    choices = ", ".join(member.value for member in KeyType)
    raise UsageError(f"unsupported key: use one of {choices}")


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The digest a CA with ``key`` signs with: SHA-384 for P-384, none for Ed25519 and ML-DSA
    (they hash internally), SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return hashes.SHA384() if isinstance(key.curve, ec.SECP384R1) else hashes.SHA256()
    if isinstance(key, rsa.RSAPrivateKey):
        return hashes.SHA256()
    return None


def sign_bytes(key: PrivateKey, data: bytes) -> bytes:
    """A signature over ``data``: ECDSA/RSA PKCS#1 v1.5 with SHA-256, Ed25519 or ML-DSA as is."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data)


def signature_is_valid(key: object, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` over ``data`` verifies with the public ``key`` (as
    :func:`sign_bytes` makes it); False for a bad signature or a key of another kind."""
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(
            key,
            ed25519.Ed25519PublicKey
            | mldsa.MLDSA44PublicKey
            | mldsa.MLDSA65PublicKey
            | mldsa.MLDSA87PublicKey,
        ):
            key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM; the caller writes it with mode 0600."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(data: bytes, *, source: str) -> PrivateKey:
    """Load a PEM private key, naming ``source`` when it cannot be read."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{source}: not a readable unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, PrivateKey):
        choices = ", ".join(member.value for member in KeyType)
        raise UsageError(f"{source}: unsupported key algorithm; use one of {choices}")
    return key

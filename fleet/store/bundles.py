"""Exporting a device's key and chain as a PKCS#12 bundle."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    NoEncryption,
    pkcs12,
)

from fleet.kernel.errors import CertificateError, NameTakenError
from fleet.kernel.files import write_secret
from fleet.kernel.keys import key_type_of, load_private_key
from fleet.store.workspace import Workspace


def export_pkcs12(
    workspace: Workspace, device_id: str, out: Path, *, password: str | None = None
) -> Path:
    """Write ``out`` (mode 0600) with the device's key, certificate and the CA chain."""
    record = workspace.registry.get(device_id)  # raises UnknownDeviceError
    key_path = workspace.paths.device_key(device_id)
    if record.key_source == "csr" or not key_path.exists():
        raise CertificateError(
            "no private key in the workspace (it was provisioned from a CSR and the device keeps "
            "its key): build the bundle on the device",
            device_id=device_id,
        )
    if out.exists():
        raise NameTakenError(f"{out}: already exists; choose another output path", field="out")
    chain = x509.load_pem_x509_certificates(workspace.paths.device_cert(device_id).read_bytes())
    key = load_private_key(key_path.read_bytes(), source=str(key_path))
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise CertificateError(
            f"PKCS#12 cannot carry a {key_type_of(key).value} key (cryptography and OpenSSL write "
            "PKCS#12 for RSA, ECDSA and Ed25519 only): copy the PEM key and certificate instead",
            device_id=device_id,
        )
    encryption = BestAvailableEncryption(password.encode()) if password else NoEncryption()
    data = pkcs12.serialize_key_and_certificates(
        name=device_id.encode(),
        key=key,
        cert=chain[0],
        cas=[*chain[1:], workspace.ca.root_cert],
        encryption_algorithm=encryption,
    )
    write_secret(out, data)
    return out

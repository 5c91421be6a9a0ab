"""A device's own key and certificate on disk, replaced as a pair without a torn state.

Two files cannot be renamed at once. A renewal therefore writes ``key.pem.new`` and then
``cert.pem.new`` (each complete and synced before it gets that name), and only then renames
the key, then the certificate. :func:`recover_identity` (run before every load) finishes or
undoes a replacement that a crash interrupted:

* both ``.new`` files present: the pair is complete, finish both renames;
* only ``cert.pem.new``: the key was renamed already, finish the certificate;
* only ``key.pem.new``: its certificate never arrived, drop it (the old pair still works).
"""

from __future__ import annotations

import os
from pathlib import Path

from fleet.kernel.files import SECRET_MODE, replace_atomically


def _pending(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def install_identity(cert: Path, key: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Replace the device's key and certificate with a new pair (key mode 0600)."""
    cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    replace_atomically(_pending(key), key_pem, mode=SECRET_MODE)
    replace_atomically(_pending(cert), cert_pem)
    os.replace(_pending(key), key)
    os.replace(_pending(cert), cert)


def recover_identity(cert: Path, key: Path) -> bool:
    """Finish (or undo) a replacement of the pair that a crash interrupted; True when a new
    pair was put in place."""
    new_cert, new_key = _pending(cert), _pending(key)
    if new_key.exists():
        if new_cert.exists():
            os.replace(new_key, key)
        else:
            new_key.unlink()
    if new_cert.exists():
        os.replace(new_cert, cert)
        return True
    return False

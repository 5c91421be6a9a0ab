"""File writes with the right permissions from the first byte, and atomic replacement."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def _write_new(path: str | Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite; the mode is applied at creation, so a secret is never readable by
    # others, not even for an instant (no chmod after writing).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_secret(path: str | Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 holding ``data`` (a private key, a PKCS#12 bundle)."""
    _write_new(path, data, SECRET_MODE)


def write_public(path: str | Path, data: bytes) -> None:
    """Create ``path`` with mode 0644 holding ``data`` (a certificate, a CRL)."""
    _write_new(path, data, PUBLIC_MODE)


def replace_atomically(path: Path, data: bytes, *, mode: int = PUBLIC_MODE) -> None:
    """Replace ``path`` so readers see the old or the new content, never a mix.

    Writes a temporary file in the same directory, flushes it to disk, then renames it over
    ``path``. A reader that opened the old file keeps reading the old one.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)  # the file is still empty and private to us: mode before content
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: Path, *, dry_run: bool = False) -> list[Path]:
    """The temporary files a killed :func:`replace_atomically` of ``path`` left (removed unless
    ``dry_run``). Call it only while holding the lock that orders writers of ``path``."""
    stale = sorted(path.parent.glob(f"{_temporary_prefix(path)}*.tmp"))
    if not dry_run:
        for each in stale:
            each.unlink(missing_ok=True)
    return stale


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FileIdentity = tuple[int, int, int]


def file_identity(path: Path) -> FileIdentity | None:
    """(inode, mtime ns, size) of ``path``, None when it is missing: a file replaced or rewritten
    (atomically or not) gets a new identity, which is how watchers see a change."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)

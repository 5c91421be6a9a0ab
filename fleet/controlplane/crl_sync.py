"""``fleet crl sync``: keep another broker's CRL file current from ``fleet serve``.

Mosquitto (and most brokers) read their ``crlfile`` at start and on SIGHUP only. This fetches
the CRLs from a URL, checks every signature against the workspace's trusted issuing CAs,
replaces the file atomically when the content changed, and signals the broker to reread it.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from fleet.kernel.errors import FleetError
from fleet.kernel.files import replace_atomically
from fleet.store.crls import CrlError, load_issuers, parse_crls
from fleet.store.workspace import Workspace


@dataclass(frozen=True, slots=True)
class SyncResult:
    changed: bool
    crl_number: int
    signalled: int | None


def sync_crl(
    workspace: Workspace,
    url: str,
    out: Path,
    *,
    signal_pid: int | None = None,
    timeout: float = 10.0,
) -> SyncResult:
    """Fetch, verify, replace ``out`` if it changed, then SIGHUP ``signal_pid`` (if given)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # http(s) checked by CLI
            data: bytes = response.read(16 * 1024 * 1024)
    except OSError as exc:
        raise FleetError(f"cannot fetch the CRL from {url}: {exc}; {out} is unchanged") from exc
    try:
        state = parse_crls(data, load_issuers(workspace.paths), source=url)
    except CrlError as exc:
        raise FleetError(f"{exc}; {out} is unchanged") from exc
    pem = b"".join(crl.public_bytes(Encoding.PEM) for crl in state.crls)
    if out.exists() and out.read_bytes() == pem:
        return SyncResult(False, state.number, None)
    replace_atomically(out, pem)
    if signal_pid is not None:
        try:
            os.kill(signal_pid, signal.SIGHUP)
        except ProcessLookupError:
            raise FleetError(
                f"wrote {out}, but no process {signal_pid} to signal: is the broker running?"
            ) from None
    return SyncResult(True, state.number, signal_pid)

"""The broker's TLS context (built by :func:`fleet.kernel.tls.broker_context`) and the CRL
history it keeps.

A new context is built for every new CRL: an OpenSSL store keeps every CRL it was given, so
adding the second one to the first context would leave the first in force.
"""

from __future__ import annotations

import json
from pathlib import Path

from OpenSSL import SSL

from fleet.kernel.errors import FleetError
from fleet.kernel.files import replace_atomically
from fleet.kernel.handshake_trace import HandshakeTracer
from fleet.kernel.tls import ServerFiles, VerifyCallback, broker_context
from fleet.store.crls import CrlState, issuer_files
from fleet.store.workspace import WorkspacePaths


class BrokerError(FleetError):
    """The broker cannot start or cannot load what it needs."""


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


def build_server_context(
    paths: WorkspacePaths,
    *,
    crl: CrlState | None,
    check_crl: bool,
    verify_callback: VerifyCallback,
    groups: tuple[str, ...] = (),
    tracer: HandshakeTracer | None = None,
) -> SSL.Context:
    """The broker's server context over the workspace's files, the leaf checked against
    ``crl`` when ``check_crl`` (the whole chain once the root has a CRL of its own)."""
    files = ServerFiles(
        paths.server_cert, paths.server_key, paths.root_cert, tuple(issuer_files(paths))
    )
    enforced = crl if check_crl else None
    try:
        return broker_context(
            files,
            crls=enforced.crls if enforced else (),
            check_whole_chain=enforced is not None and enforced.has_root_crl,
            verify_callback=verify_callback,
            groups=groups,
            tracer=tracer,
        )
    except FleetError as exc:
        raise BrokerError(str(exc)) from exc

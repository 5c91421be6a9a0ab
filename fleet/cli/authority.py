"""``fleet crl publish|sync`` and ``fleet ca rotate|retire|revoke-issuing``: the CRL and the
issuing CAs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from fleet.cli.support import (
    DirOption,
    friendly_errors,
    out,
)
from fleet.kernel.durations import parse_positive_duration
from fleet.kernel.errors import UsageError
from fleet.kernel.signals import stop_on_signals
from fleet.store.ca import REVOCATION_REASONS, parse_revocation_reason
from fleet.store.revocation import publish_crl
from fleet.store.workspace import DEFAULT_DIR, Workspace

crl_app = typer.Typer(
    help="Publish and inspect the certificate revocation list.", no_args_is_help=True
)
ca_app = typer.Typer(help="Rotate, retire and revoke issuing CAs.", no_args_is_help=True)


@crl_app.command("publish")
@friendly_errors
def crl_publish(directory: DirOption = DEFAULT_DIR) -> None:
    """Sign a fresh CRL now (run it before nextUpdate, e.g. from cron, to keep brokers fed)."""
    workspace = Workspace.open(directory)
    crl = publish_crl(workspace)
    out.print(
        f"published CRL #{crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number} "
        f"with {len(list(crl))} revoked certificate(s), next update {crl.next_update_utc:%Y-%m-%d %H:%M:%S} UTC",
        highlight=False,
    )


@crl_app.command("sync")
@friendly_errors
def crl_sync(
    url: Annotated[
        str, typer.Option(help="Where 'fleet serve' publishes, e.g. http://HOST:8080/crl.pem.")
    ],
    out_file: Annotated[Path, typer.Option("--out", help="The broker's CRL file to keep current.")],
    directory: DirOption = DEFAULT_DIR,
    signal_pid: Annotated[
        int | None,
        typer.Option(
            "--signal", help="PID to send SIGHUP after a change (Mosquitto rereads its crlfile)."
        ),
    ] = None,
    every: Annotated[
        str | None, typer.Option(help="Keep syncing at this interval (e.g. 60s) until Ctrl-C.")
    ] = None,
) -> None:
    """Fetch the CRLs, verify their signatures, replace OUT when they changed, signal the broker."""
    from fleet.controlplane.crl_sync import sync_crl

    if not url.startswith(("http://", "https://")):
        raise UsageError(f"invalid --url {url!r}: use an http:// or https:// URL")
    interval = parse_positive_duration(every).total_seconds() if every else None
    workspace = Workspace.open(directory)
    with stop_on_signals() as stop:
        while True:
            result = sync_crl(workspace, url, out_file, signal_pid=signal_pid)
            if result.changed:
                signalled = f"; sent SIGHUP to {signal_pid}" if signal_pid else ""
                out.print(f"wrote CRL #{result.crl_number} to {out_file}{signalled}")
            elif interval is None:
                out.print(f"{out_file} already holds CRL #{result.crl_number}; nothing changed")
            if interval is None:
                return
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline:
                if stop.requested:
                    return
                time.sleep(0.2)


@ca_app.command("rotate")
@friendly_errors
def ca_rotate(directory: DirOption = DEFAULT_DIR) -> None:
    """Make a new issuing intermediate current; the old one stays trusted until retired."""
    from fleet.store.ca_rotation import rotate_issuing_ca

    workspace = Workspace.open(directory)
    cert = rotate_issuing_ca(workspace)
    out.print(
        f"new issuing CA {cert.subject.rfc4514_string()} signs from now on; the previous one "
        f"stays trusted until 'fleet ca retire'. CRL published to {workspace.paths.crl}",
        highlight=False,
    )


@ca_app.command("retire")
@friendly_errors
def ca_retire(directory: DirOption = DEFAULT_DIR) -> None:
    """Stop trusting the issuing CAs a rotation replaced (their devices are then refused)."""
    from fleet.store.ca_rotation import retire_previous_issuers

    workspace = Workspace.open(directory)
    retired = retire_previous_issuers(workspace)
    if not retired:
        out.print("no previous issuing CA to retire; nothing changed")
        return
    out.print(f"retired {', '.join(retired)}; CRL published to {workspace.paths.crl}")


@ca_app.command("revoke-issuing")
@friendly_errors
def ca_revoke_issuing(
    directory: DirOption = DEFAULT_DIR,
    serial: Annotated[
        str | None,
        typer.Option(help="Hex serial of the issuing CA (default: every previous one)."),
    ] = None,
    reason: Annotated[
        str, typer.Option(help=f"One of {', '.join(REVOCATION_REASONS)}.")
    ] = "ca-compromise",
) -> None:
    """Revoke issuing CAs a rotation replaced, in the root's CRL (a compromised intermediate)."""
    from fleet.store.ca_rotation import revoke_issuing_cas

    try:
        number = int(serial, 16) if serial is not None else None
    except ValueError:
        raise UsageError(f"invalid --serial {serial!r}: give the serial in hex") from None
    workspace = Workspace.open(directory)
    revoked = revoke_issuing_cas(workspace, serial=number, reason=parse_revocation_reason(reason))
    if not revoked:
        out.print("no issuing CA to revoke (none previous, or already revoked); nothing changed")
        return
    out.print(
        f"revoked {', '.join(revoked)} in the root's CRL ({reason}); CRL published to "
        f"{workspace.paths.crl}: brokers checking the whole chain refuse its devices",
        highlight=False,
    )

"""Commands on provisioned devices: ``fleet revoke``, ``renew``, ``inventory``, ``show``,
``export``."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from fleet.cli.support import (
    AdminOption,
    DirOption,
    ServerOption,
    admin_client,
    err,
    friendly_errors,
    out,
)
from fleet.kernel.durations import parse_positive_duration
from fleet.kernel.errors import FleetError, UsageError
from fleet.store.bundles import export_pkcs12
from fleet.store.ca import REVOCATION_REASONS, parse_revocation_reason
from fleet.store.renewal import renew_device
from fleet.store.revocation import revoke_device, revoke_devices, revoke_superseded
from fleet.store.views import STATUSES, device_details
from fleet.store.views import inventory as inventory_rows
from fleet.store.workspace import DEFAULT_DIR, Workspace


@friendly_errors
def revoke(
    device_ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="ID...", help="The devices to revoke (one CRL for them all)."),
    ] = None,
    directory: DirOption = DEFAULT_DIR,
    prefix: Annotated[
        str | None,
        typer.Option(help="Also revoke every active device named PREFIX-<number> (a batch)."),
    ] = None,
    reason: Annotated[
        str | None,
        typer.Option(
            help=f"One of {', '.join(REVOCATION_REASONS)} (default: unspecified, or superseded)."
        ),
    ] = None,
    superseded_only: Annotated[
        bool,
        typer.Option(
            help="Revoke only the certificates 'fleet renew' replaced; the device stays active."
        ),
    ] = False,
    server: ServerOption = None,
    admin: AdminOption = None,
) -> None:
    """Revoke devices and publish a fresh CRL (DIR/ca/crl.pem, replaced atomically)."""
    reason = reason or ("superseded" if superseded_only else "unspecified")
    flag = parse_revocation_reason(reason)
    ids = list(device_ids or [])
    if server:
        if prefix:
            raise UsageError("--prefix works on a local workspace (--dir), not with --server")
        if not ids:
            raise UsageError("name the devices to revoke: fleet revoke ID... (or --prefix)")
        client = admin_client(server, admin, directory)
        for device_id in ids:
            path = f"/v1/devices/{urllib.parse.quote(device_id, safe='')}/revoke"
            answer = client.post(path, {"reason": reason, "superseded_only": superseded_only})
            _say_revoked(device_id, answer["revoked_serials"], answer["crl_number"], reason,
                         server, superseded_only)  # fmt: skip
        return
    workspace = Workspace.open(directory)
    for repair in workspace.repairs:
        err.print(f"note: {repair}", highlight=False)
    if prefix:
        ids += [r.device_id for r in workspace.registry.devices(status="active")
                if re.fullmatch(rf"{re.escape(prefix)}-\d+", r.device_id)]  # fmt: skip
    if not ids:
        raise UsageError("name the devices to revoke: fleet revoke ID... (or --prefix PREFIX)")
    where = str(workspace.paths.crl)
    if superseded_only or len(ids) == 1:
        revoke = revoke_superseded if superseded_only else revoke_device
        for device_id in ids:
            result = revoke(workspace, device_id, reason=flag)
            if result.repaired_serials:
                repaired = ", ".join(format(s, "X") for s in result.repaired_serials)
                out.print(
                    f"{device_id} was revoked but the CRL lacked serial {repaired}; "
                    f"CRL #{result.crl_number} published ({where})",
                    highlight=False,
                )
                continue
            serials = [format(s, "X") for s in result.revoked_serials]
            _say_revoked(device_id, serials, result.crl_number, reason, where, superseded_only)
        return
    results = revoke_devices(workspace, ids, reason=flag)
    done = [r for r in results if r.revoked_serials]
    already = len(results) - len(done)
    numbers = {r.crl_number for r in done}
    crl = f"CRL #{numbers.pop()} published ({where})" if numbers else "no CRL needed"
    out.print(
        f"revoked {len(done)} device(s) with one CRL, reason {reason}"
        + (f"; {already} already revoked" if already else "")
        + f"; {crl}",
        highlight=False,
    )


def _say_revoked(
    device_id: str,
    serials: list[str],
    crl_number: int | None,
    reason: str,
    where: str,
    superseded_only: bool,
) -> None:
    if not serials:
        what = "had no superseded certificates" if superseded_only else "was already revoked"
        out.print(f"{device_id} {what}; nothing changed")
        return
    out.print(
        f"revoked {device_id} (serial {', '.join(serials)}, reason {reason}); "
        f"CRL #{crl_number} published ({where})",
        highlight=False,
    )


@friendly_errors
def renew(
    device_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="The devices to renew.")],
    directory: DirOption = DEFAULT_DIR,
    valid_for: Annotated[
        str | None, typer.Option(help="Validity of the new certificates (default: fleet.toml).")
    ] = None,
) -> None:
    """Issue fresh certificates for the devices' keys; the old ones stay valid (overlap)."""
    validity = parse_positive_duration(valid_for) if valid_for else None
    workspace = Workspace.open(directory)
    for device_id in device_ids:
        result = renew_device(workspace, device_id, valid_for=validity)
        out.print(
            f"renewed {device_id}: serial {result.serial:X} valid until "
            f"{result.not_after.isoformat()}; {result.superseded_serial:X} superseded "
            f"(revoke it with 'fleet revoke {device_id} --superseded-only')",
            highlight=False,
        )


@friendly_errors
def inventory(
    directory: DirOption = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    expiring_within: Annotated[
        str | None, typer.Option(help="Only devices whose certificate ends within this (e.g. 7d).")
    ] = None,
    status: Annotated[str | None, typer.Option(help=f"Only one of {', '.join(STATUSES)}.")] = None,
    limit: Annotated[
        int, typer.Option(help="Show at most this many rows in the table (0: all).")
    ] = 0,
    server: ServerOption = None,
    admin: AdminOption = None,
) -> None:
    """List devices with their certificate status and expiry."""
    if status is not None and status not in STATUSES:
        raise FleetError(f"invalid --status {status!r}: choose one of {', '.join(STATUSES)}")
    now = dt.datetime.now(dt.UTC)
    if server:
        client = admin_client(server, admin, directory)
        listing = client.get("/v1/devices", status=status, expiring_within=expiring_within)
        rows: list[dict[str, Any]] = listing["devices"]
        source = server
    else:
        soon = parse_positive_duration(expiring_within) if expiring_within else None
        rows = inventory_rows(Workspace.open(directory), expiring_within=soon, status=status)
        source = str(directory)
    if as_json:
        json.dump(
            {"generated_at": now.isoformat(), "count": len(rows), "devices": rows},
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return
    shown = rows[:limit] if limit > 0 else rows
    table = Table(title=f"{len(rows)} device(s) in {source}", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("id", "serial", "tier", "env", "status", "expires (UTC)", "days"):
        table.add_column(column, no_wrap=True, justify="right" if column == "days" else "left")
    for row in shown:
        days = f"{row['days_left']:.1f}"
        table.add_row(
            row["id"],
            row["serial"][:8] + "…",
            row["tier"],
            row["env"],
            _styled_status(row["status"]),
            row["not_after"][:16].replace("T", " "),
            f"[yellow]{days} soon[/]" if row["expiring_soon"] else days,
        )
    out.print(table)
    if len(shown) < len(rows):
        out.print(f"... and {len(rows) - len(shown)} more (use --limit 0 or --json for all)")


def _styled_status(status: str) -> str:
    colour = {"active": "green", "revoked": "red", "expired": "red", "not-yet-valid": "yellow"}[
        status
    ]
    return f"[{colour}]{status}[/]"


@friendly_errors
def show(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device to show.")],
    directory: DirOption = DEFAULT_DIR,
    server: ServerOption = None,
    admin: AdminOption = None,
) -> None:
    """Print one device's registry record, its decoded certificate, history and enrollment."""
    if server:
        path = f"/v1/devices/{urllib.parse.quote(device_id, safe='')}"
        details = admin_client(server, admin, directory).get(path)
    else:
        details = device_details(Workspace.open(directory), device_id)
    table = Table(title=f"device {device_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    certificate = details.pop("certificate")
    history = details.pop("history")
    enrollment = details.pop("enrollment")
    for key, value in details.items():
        table.add_row(key, "-" if value is None else str(value))
    table.add_section()
    for key, value in certificate.items():
        table.add_row(f"cert.{key}", value)
    table.add_section()
    for entry in history:
        table.add_row(
            "history",
            f"{entry['serial'][:12]}… {entry['status']} "
            f"{entry['not_before'][:19]} .. {entry['not_after'][:19]}",
        )
    if enrollment is not None:
        table.add_row(
            "enrolled",
            f"through claim {enrollment['claim']} at {enrollment['enrolled_at'][:19]}"
            f" (hardware serial {enrollment['hardware_serial'] or '-'})",
        )
    out.print(table)


@friendly_errors
def export(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device to export.")],
    p12: Annotated[Path, typer.Option("--p12", help="Output PKCS#12 file (written 0600).")],
    directory: DirOption = DEFAULT_DIR,
    password: Annotated[
        str | None, typer.Option(help="Encrypt the bundle with this password (none: unencrypted).")
    ] = None,
) -> None:
    """Write a device's key, certificate and CA chain as a PKCS#12 bundle."""
    workspace = Workspace.open(directory)
    path = export_pkcs12(workspace, device_id, p12, password=password)
    out.print(f"wrote {path} (key, certificate and CA chain of {device_id})")

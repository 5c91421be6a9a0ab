"""``fleet admin create|list|revoke``: the operators' (and the control plane's) identities."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from fleet.cli.support import DirOption, friendly_errors, out
from fleet.store.admins import create_admin, list_admins, revoke_admin
from fleet.store.records import serial_hex
from fleet.store.workspace import DEFAULT_DIR, Workspace

admin_app = typer.Typer(
    help="Admin identities: who may use the admin API and act as the control plane.",
    no_args_is_help=True,
)


@admin_app.command("create")
@friendly_errors
def admin_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The operator, e.g. alice.")],
    directory: DirOption = DEFAULT_DIR,
) -> None:
    """Issue an admin certificate into DIR/admins/NAME/ (cert.pem, key.pem 0600, root.crt)."""
    workspace = Workspace.open(directory)
    cert, bundle = create_admin(workspace, name)
    out.print(
        f"admin {name}: serial {cert.serial_number:X}, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d}; bundle in {bundle} (use it with --admin)",
        highlight=False,
    )


@admin_app.command("list")
@friendly_errors
def admin_list(
    directory: DirOption = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every admin certificate with its status."""
    rows = [
        {
            "name": record.name,
            "serial": serial_hex(record.serial),
            "issued_at": record.issued_at.isoformat(),
            "not_after": record.not_after.isoformat(),
            "status": record.status,
        }
        for record in list_admins(Workspace.open(directory))
    ]
    if as_json:
        json.dump({"admins": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table = Table(title=f"{len(rows)} admin certificate(s)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "serial", "expires (UTC)", "status"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            row["name"],
            row["serial"][:8] + "…",
            row["not_after"][:16].replace("T", " "),
            row["status"],
        )
    out.print(table)


@admin_app.command("revoke")
@friendly_errors
def admin_revoke(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The admin to cut off.")],
    directory: DirOption = DEFAULT_DIR,
) -> None:
    """Revoke every certificate of an admin: brokers and the admin API refuse it from now on."""
    workspace = Workspace.open(directory)
    serials = revoke_admin(workspace, name)
    if not serials:
        out.print(f"admin {name} was already revoked; nothing changed")
        return
    listed = ", ".join(format(s, "X") for s in serials)
    out.print(f"revoked admin {name} (serial {listed}); CRL published", highlight=False)

"""What every ``fleet`` command module shares: consoles, common options, error handling."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console

from fleet.controlplane.admin_client import AdminClient
from fleet.kernel.errors import FleetError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

P = ParamSpec("P")
R = TypeVar("R")

DirOption = Annotated[
    Path, typer.Option("--dir", "-d", help="The fleet workspace directory.", envvar="FLEET_DIR")
]


DeviceGroupsOption = Annotated[
    str | None,
    typer.Option(
        "--groups",
        help="Key-exchange groups the devices offer, preferred first "
        "(e.g. X25519MLKEM768,X25519) [default: P-256].",
    ),
]


ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Ask the control plane's admin API (https://HOST:PORT of 'fleet serve --api-port') "
        "instead of opening DIR.",
        envvar="FLEET_SERVER",
    ),
]
AdminOption = Annotated[
    Path | None,
    typer.Option(
        "--admin",
        help="Admin bundle for --server: cert.pem, key.pem, root.crt (default: DIR/admin).",
        envvar="FLEET_ADMIN",
    ),
]


def admin_client(server: str, admin: Path | None, directory: Path) -> AdminClient:
    return AdminClient(server, admin or directory / "admin")


def friendly_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`FleetError` into one line on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except FleetError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper

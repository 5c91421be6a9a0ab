"""``fleet claim create|list|revoke`` and ``fleet enroll``: provisioning by claim."""

from __future__ import annotations

import datetime as dt
import json
import sys
import urllib.parse
from pathlib import Path
from typing import Annotated

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
from fleet.kernel.errors import UsageError
from fleet.kernel.identity import ENVIRONMENTS, TIERS
from fleet.store.views import claim_view
from fleet.store.workspace import DEFAULT_DIR, Workspace

claim_app = typer.Typer(
    help="Claims: one certificate a batch of new devices enrolls with (bootstrap).",
    no_args_is_help=True,
)


@claim_app.command("create")
@friendly_errors
def claim_create(
    name: Annotated[str, typer.Option(help="The claim's name, e.g. factory-batch-7.")],
    directory: DirOption = DEFAULT_DIR,
    max_uses: Annotated[int, typer.Option(help="How many devices it may enroll.")] = 1000,
    valid_for: Annotated[str, typer.Option(help="How long the claim can be used.")] = "30d",
    allow_ids: Annotated[
        str, typer.Option(help="Shell pattern the enrolling ids must match, e.g. 'sensor-*'.")
    ] = "*",
    tier: Annotated[str, typer.Option(help=f"Tier of the devices: {', '.join(TIERS)}.")] = "bronze",
    env: Annotated[str, typer.Option(help=f"Environment: {', '.join(ENVIRONMENTS)}.")] = "prod",
    device_valid_for: Annotated[
        str | None,
        typer.Option(help="Lifetime of the enrolled devices' certificates (default: fleet.toml)."),
    ] = None,
    server: ServerOption = None,
    admin: AdminOption = None,
    bundle_out: Annotated[
        Path | None,
        typer.Option(help="With --server: write the claim's cert.pem, key.pem, root.crt here."),
    ] = None,
) -> None:
    """Issue a claim certificate into DIR/claims/NAME/ (cert.pem, key.pem, root.crt)."""
    from fleet.store.claims import ClaimRules, create_claim

    if server:
        view = admin_client(server, admin, directory).post(
            "/v1/claims",
            {
                "name": name,
                "max_uses": max_uses,
                "valid_for": valid_for,
                "allow_ids": allow_ids,
                "tier": tier,
                "env": env,
                "device_valid_for": device_valid_for,
            },
        )
        bundle = view.pop("bundle")
        where = bundle_out or Path(name)
        _write_claim_bundle(where, bundle)
    else:
        rules = ClaimRules(
            name=name,
            max_uses=max_uses,
            valid_for=parse_positive_duration(valid_for),
            allow_ids=allow_ids,
            tier=tier,
            env=env,
            device_valid_for=parse_positive_duration(device_valid_for)
            if device_valid_for
            else None,
        )
        workspace = Workspace.open(directory)
        view = claim_view(create_claim(workspace, rules), dt.datetime.now(dt.UTC))
        where = workspace.paths.claim_dir(name)
    out.print(
        f"claim {view['name']}: up to {view['max_uses']} {view['tier']} {view['env']} devices "
        f"with ids matching {view['allow_ids']!r} until {view['not_after']}; give devices "
        f"{where}/ and run 'fleet serve --broker ...'",
        highlight=False,
    )


def _write_claim_bundle(directory: Path, bundle: dict[str, str]) -> None:
    from fleet.kernel.files import PRIVATE_DIR_MODE, write_public, write_secret

    if directory.exists():
        raise UsageError(f"{directory} already exists; choose another --bundle-out")
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
    write_secret(directory / "key.pem", bundle["key.pem"].encode())
    write_public(directory / "cert.pem", bundle["cert.pem"].encode())
    write_public(directory / "root.crt", bundle["root.crt"].encode())


@claim_app.command("list")
@friendly_errors
def claim_list(
    directory: DirOption = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    server: ServerOption = None,
    admin: AdminOption = None,
) -> None:
    """List the claims with their rules and uses."""
    if server:
        rows = admin_client(server, admin, directory).get("/v1/claims")["claims"]
    else:
        now = dt.datetime.now(dt.UTC)
        rows = [claim_view(c, now) for c in Workspace.open(directory).registry.claims()]
    if as_json:
        json.dump({"claims": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table = Table(title=f"{len(rows)} claim(s)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "tier", "env", "ids", "uses", "expires (UTC)", "status"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            str(row["name"]),
            str(row["tier"]),
            str(row["env"]),
            str(row["allow_ids"]),
            f"{row['uses']}/{row['max_uses']}",
            str(row["not_after"])[:16].replace("T", " "),
            str(row["status"]),
        )
    out.print(table)


@claim_app.command("revoke")
@friendly_errors
def claim_revoke(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The claim to revoke.")],
    directory: DirOption = DEFAULT_DIR,
    server: ServerOption = None,
    admin: AdminOption = None,
) -> None:
    """Stop a claim enrolling devices (its certificate goes on the CRL); enrolled devices stay."""
    from fleet.store.claims import revoke_claim

    if server:
        path = f"/v1/claims/{urllib.parse.quote(name, safe='')}/revoke"
        changed = bool(admin_client(server, admin, directory).post(path, {})["revoked"])
    else:
        changed = revoke_claim(Workspace.open(directory), name)
    if not changed:
        out.print(f"claim {name} was already revoked; nothing changed")
        return
    out.print(f"revoked claim {name}; a fresh CRL is published", highlight=False)


@friendly_errors
def enroll(
    claim: Annotated[
        Path, typer.Option(help="The claim directory a device holds (DIR/claims/NAME).")
    ],
    device_ids: Annotated[
        list[str], typer.Option("--id", help="Device id to enroll (repeat for several).")
    ],
    store: Annotated[
        Path, typer.Option(help="Where each device keeps STORE/<id>/key.pem and cert.pem.")
    ],
    target: Annotated[
        str, typer.Option(help="mqtts://HOST:PORT of the broker the control plane answers on.")
    ] = "mqtts://127.0.0.1:8883",
    server_name: Annotated[
        str, typer.Option(help="Host name the broker certificate must carry.")
    ] = "localhost",
    hardware_serial: Annotated[
        str, typer.Option(help="A hardware serial recorded with the enrollment.")
    ] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 10.0,
) -> None:
    """Enroll devices through a claim, as the devices themselves do.

    Each connects with the claim, sends a CSR for a key generated here and keeps the key.
    Exit 1 when any enrollment was refused or failed."""
    import asyncio

    from device.enrollment import ClaimBundle, EnrollmentResult, enroll
    from fleet.cli.swarm import parse_target

    host, port = parse_target(target)
    bundle = ClaimBundle(claim)

    async def enroll_all() -> list[EnrollmentResult]:
        context = bundle.context()
        return list(
            await asyncio.gather(
                *(
                    enroll(
                        device_id, bundle, store, host=host, port=port, server_name=server_name,
                        hardware_serial=hardware_serial, timeout=timeout, context=context,
                    )
                    for device_id in device_ids
                )
            )
        )  # fmt: skip

    failed = 0
    for result in asyncio.run(enroll_all()):
        if result.enrolled:
            out.print(
                f"enrolled {result.device_id} in {result.seconds * 1000:.0f} ms: "
                f"{store / result.device_id}/cert.pem and key.pem",
                highlight=False,
            )
        else:
            failed += 1
            err.print(
                f"{result.device_id}: {result.status} ({result.reason}) {result.detail}",
                highlight=False,
            )
    if failed:
        raise typer.Exit(1)

"""``fleet provision``: new devices (keys made here, or from a CSR), replacements, remotely
through the admin API or on the workspace directly."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleet.cli.support import (
    AdminOption,
    DirOption,
    ServerOption,
    admin_client,
    err,
    friendly_errors,
    out,
)
from fleet.controlplane.admin_client import AdminClient
from fleet.kernel.durations import parse_instant, parse_positive_duration
from fleet.kernel.errors import FleetError, UsageError
from fleet.kernel.identity import ENVIRONMENTS, TIERS
from fleet.kernel.keys import KeyType
from fleet.store.provisioning import ProvisionSpec, provision_devices, provision_from_csr
from fleet.store.replacement import replace_device
from fleet.store.workspace import DEFAULT_DIR, Workspace


@friendly_errors
def provision(
    directory: DirOption = DEFAULT_DIR,
    count: Annotated[int, typer.Option("--count", "-n", help="How many devices.")] = 1,
    prefix: Annotated[
        str, typer.Option(help="Device ids are PREFIX-00001, PREFIX-00002, ...")
    ] = "device",
    tier: Annotated[str, typer.Option(help=f"One of {', '.join(TIERS)}.")] = "bronze",
    env: Annotated[str, typer.Option(help=f"One of {', '.join(ENVIRONMENTS)}.")] = "prod",
    valid_for: Annotated[
        str | None, typer.Option(help="Validity, e.g. 90d, 12h, 30s (default: the workspace's).")
    ] = None,
    not_before: Annotated[
        str | None, typer.Option(help="Start of validity: ISO 8601, 'now' or relative (-2d, +1h).")
    ] = None,
    key_type: Annotated[
        str | None, typer.Option(help="ec-p256, ec-p384, rsa2048 or rsa3072.")
    ] = None,
    csr: Annotated[
        Path | None, typer.Option(help="Sign this device-generated CSR instead (needs --id).")
    ] = None,
    device_id: Annotated[
        str | None, typer.Option("--id", help="Device id for --csr or --replace.")
    ] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Give the revoked device --id a new key and certificate (its history is kept).",
        ),
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="Processes to use (default: one per core).")
    ] = None,
    server: ServerOption = None,
    admin: AdminOption = None,
) -> None:
    """Create devices, each with its own key and certificate (or sign one device's CSR)."""
    if server and replace:
        raise UsageError("--replace works on a local workspace (--dir), not with --server")
    if server:
        _provision_remotely(
            admin_client(server, admin, directory),
            {"count": count, "prefix": prefix, "tier": tier, "env": env, "valid_for": valid_for,
             "key_type": key_type, "id": device_id},
            csr,
        )  # fmt: skip
        return
    workspace = Workspace.open(directory)
    now = dt.datetime.now(dt.UTC)
    validity = parse_positive_duration(valid_for) if valid_for else None
    start = parse_instant(not_before, now=now) if not_before else None
    if replace:
        _replace(workspace, device_id, valid_for=validity, key_type=key_type, csr=csr)
        return
    if csr is not None:
        _provision_csr(
            workspace, csr, device_id, tier=tier, env=env, valid_for=validity, not_before=start
        )
        return
    if device_id is not None:
        raise FleetError("--id is only used with --csr; use --prefix and --count for new keys")
    spec = ProvisionSpec(
        count=count,
        prefix=prefix,
        tier=tier,
        env=env,
        valid_for=validity,
        not_before=start,
        key_type=KeyType.parse(key_type) if key_type else None,
    )
    spec.validate()
    with _progress_reporter("provisioning") as report:
        result = provision_devices(workspace, spec, workers=workers, progress=report, now=now)
    rate = len(result.device_ids) / result.elapsed_s if result.elapsed_s else float("inf")
    first, last = result.device_ids[0], result.device_ids[-1]
    span = first if first == last else f"{first} .. {last}"
    out.print(
        f"provisioned {len(result.device_ids)} devices ({span}) in {result.elapsed_s:.2f} s "
        f"({rate:,.0f} devices/s, {result.workers} process(es)); tier {spec.tier}, env {spec.env}, "
        f"valid {result.not_before:%Y-%m-%d %H:%M:%S} .. {result.not_after:%Y-%m-%d %H:%M:%S} UTC",
        highlight=False,
    )


def _provision_remotely(client: AdminClient, body: dict[str, Any], csr: Path | None) -> None:
    if csr is not None:
        try:
            body["csr"] = csr.read_text()
        except OSError as exc:
            raise FleetError(f"{csr}: cannot read the CSR ({exc.strerror})") from exc
        for ignored in ("count", "prefix", "key_type"):
            body.pop(ignored)
    answer = client.post("/v1/devices", body)
    ids = answer["devices"]
    span = ids[0] if len(ids) == 1 else f"{ids[0]} .. {ids[-1]}"
    out.print(f"provisioned {len(ids)} device(s) ({span}) through {client.url}", highlight=False)
    if "certificate" in answer:
        out.print(answer["certificate"], highlight=False, end="")


def _replace(
    workspace: Workspace,
    device_id: str | None,
    *,
    valid_for: dt.timedelta | None,
    key_type: str | None,
    csr: Path | None,
) -> None:
    if device_id is None:
        raise UsageError("--replace needs --id: the revoked device to replace")
    if csr is not None:
        raise UsageError("--replace generates the new key itself; it does not take --csr")
    result = replace_device(
        workspace,
        device_id,
        valid_for=valid_for,
        key_type=KeyType.parse(key_type) if key_type else None,
    )
    previous = ", ".join(f"{serial:X}" for serial in result.previous_serials)
    out.print(
        f"replaced {device_id}: new key and certificate, serial {result.serial:X}, valid until "
        f"{result.not_after:%Y-%m-%d %H:%M:%S} UTC -> {workspace.paths.device_cert(device_id)}; "
        f"revoked before: {previous}",
        highlight=False,
    )


def _provision_csr(
    workspace: Workspace,
    csr: Path,
    device_id: str | None,
    **options: Any,
) -> None:
    if device_id is None:
        raise FleetError("--csr needs --id: the id the device will have")
    try:
        data = csr.read_bytes()
    except OSError as exc:
        raise FleetError(f"{csr}: cannot read the CSR ({exc.strerror})") from exc
    cert = provision_from_csr(workspace, data, device_id=device_id, **options)
    out.print(
        f"signed the CSR of {device_id}: serial {cert.serial_number:X}, "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC -> "
        f"{workspace.paths.device_cert(device_id)}",
        highlight=False,
    )


class _progress_reporter:
    """A rich progress bar on a terminal; a plain line at every tenth elsewhere (CI logs)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.progress: Progress | None = None
        self.task: Any = None
        self.reported_tenth = -1

    def __enter__(self) -> Callable[[int, int], None]:
        if err.is_terminal:
            # auto_refresh=False: no refresh thread, so worker processes can be forked safely.
            self.progress = Progress(
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
                auto_refresh=False,
                transient=True,
            )
            self.progress.start()
        return self.report

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            if self.task is None:
                self.task = self.progress.add_task(self.label, total=total)
            self.progress.update(self.task, completed=done)
            self.progress.refresh()
            return
        tenth = done * 10 // total
        if tenth > self.reported_tenth:
            self.reported_tenth = tenth
            print(f"{self.label}: {done}/{total}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

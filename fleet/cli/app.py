"""The ``fleet`` command line: thin commands over the library; only this layer exits."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleet.cli.admins import admin_app
from fleet.cli.claims import claim_app, enroll
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
from fleet.kernel.config import FleetConfig
from fleet.kernel.durations import parse_instant, parse_positive_duration
from fleet.kernel.errors import FleetError, UsageError
from fleet.kernel.identity import ENVIRONMENTS, TIERS, validate_trust_domain
from fleet.kernel.keys import KeyType
from fleet.kernel.signals import stop_on_signals
from fleet.store.bundles import export_pkcs12
from fleet.store.ca import REVOCATION_REASONS, parse_revocation_reason
from fleet.store.provisioning import ProvisionSpec, provision_devices, provision_from_csr
from fleet.store.renewal import renew_device
from fleet.store.replacement import replace_device
from fleet.store.revocation import publish_crl, revoke_device, revoke_devices, revoke_superseded
from fleet.store.views import STATUSES, device_details
from fleet.store.views import inventory as inventory_rows
from fleet.store.workspace import DEFAULT_DIR, Workspace, init_workspace

app = typer.Typer(
    name="fleet",
    help="mtls-fleet: a certificate authority, registry and test bench for mutual-TLS IoT fleets.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
crl_app = typer.Typer(
    help="Publish and inspect the certificate revocation list.", no_args_is_help=True
)
app.add_typer(crl_app, name="crl")
ca_app = typer.Typer(help="Rotate, retire and revoke issuing CAs.", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
app.add_typer(claim_app, name="claim")
app.add_typer(admin_app, name="admin")
bench_app = typer.Typer(help="Load-test mutual-TLS handshakes of a broker.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
scenario_app = typer.Typer(
    help="Replay scripted scenarios (expiry, revocation, rotation, rogue brokers ...) with verdicts.",
    no_args_is_help=True,
)
app.add_typer(scenario_app, name="scenario")


@app.command()
@friendly_errors
def init(
    directory: DirOption = DEFAULT_DIR,
    trust_domain: Annotated[
        str, typer.Option(help="SPIFFE trust domain of device identities.")
    ] = "fleet.local",
    key_type: Annotated[
        str, typer.Option(help="ec-p256, ec-p384, rsa2048 or rsa3072.")
    ] = "ec-p256",
    host: Annotated[
        list[str] | None, typer.Option(help="Extra broker host name or IP (repeatable).")
    ] = None,
    device_valid_for: Annotated[str, typer.Option(help="Default device validity.")] = "90d",
    crl_valid_for: Annotated[
        str, typer.Option(help="CRL lifetime: nextUpdate - thisUpdate.")
    ] = "7d",
    crl_url: Annotated[
        str | None, typer.Option(help="CRL distribution point URL embedded in certificates.")
    ] = None,
) -> None:
    """Create a workspace: root and issuing CA, broker certificate, empty CRL, registry."""
    config = FleetConfig(
        trust_domain=validate_trust_domain(trust_domain),
        key_type=KeyType.parse(key_type),
        device_valid_for=parse_positive_duration(device_valid_for),
        crl_valid_for=parse_positive_duration(crl_valid_for),
        crl_url=crl_url,
    )
    workspace = init_workspace(directory, config=config, hosts=host or ())
    out.print(
        f"initialised fleet workspace [bold]{directory}[/] (trust domain {config.trust_domain})"
    )
    out.print(f"  trust anchor   {workspace.paths.root_cert}")
    out.print(f"  broker chain   {workspace.paths.server_cert}")
    out.print(f"  CRL            {workspace.paths.crl}")
    out.print(f"  registry       {workspace.paths.db}")


@app.command()
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


@app.command()
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


@app.command()
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


@app.command()
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


@app.command()
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


@app.command()
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


@app.command()
@friendly_errors
def serve(
    directory: DirOption = DEFAULT_DIR,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (0: any free port).")] = 8080,
    broker: Annotated[
        str | None,
        typer.Option(
            help="Also answer enrollment and renewal requests over MQTT on this broker "
            "(mqtts://HOST:PORT), connecting with DIR/admin/."
        ),
    ] = None,
    api_port: Annotated[
        int | None,
        typer.Option(help="Serve the admin API (HTTPS, mutual TLS, admin certificates) here."),
    ] = None,
) -> None:
    """Run the control plane: CRL, OCSP and /metrics over HTTP; optionally MQTT and admin API.

    The CRL is kept fresh; with --broker it enrolls devices by claim and renews certificates
    over MQTT; with --api-port it serves the admin API (HTTPS, mutual TLS)."""
    from fleet.cli.swarm import parse_target
    from fleet.controlplane.server import ControlPlane

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    workspace = Workspace.open(directory)
    target = parse_target(broker) if broker else None
    try:
        plane = ControlPlane(workspace, host=host, port=port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    plane.start()
    try:
        if target is not None:
            plane.answer_requests(*target)
        if api_port is not None:
            plane.serve_admin_api(port=api_port)
    except FleetError:
        plane.stop()
        raise
    except OSError as exc:
        plane.stop()
        raise UsageError(
            f"cannot serve the admin API on {host}:{api_port}: {exc.strerror}"
        ) from None
    answering = f"; answering certificate requests on {broker}" if broker else ""
    print(f"serving {plane.url} (CRL at /crl and /crl.pem, OCSP at /ocsp){answering}", flush=True)
    if plane.api is not None:
        print(
            f"admin API on https://{host}:{plane.api.port} (mutual TLS, admin certificates)",
            flush=True,
        )
    with stop_on_signals() as stop:
        while not stop.requested:
            time.sleep(0.2)
    plane.stop()


@app.command("broker")
@friendly_errors
def broker_command(
    directory: DirOption = DEFAULT_DIR,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="MQTT over TLS port (0: any free port).")] = 8883,
    metrics_port: Annotated[
        int, typer.Option(help="Prometheus /metrics port on the same host (-1: off).")
    ] = 9883,
    env: Annotated[
        str | None, typer.Option(help="Admit only certificates of this environment (prod or dev).")
    ] = None,
    handshake_timeout: Annotated[
        float, typer.Option(help="Seconds allowed for TLS and CONNECT.")
    ] = 10.0,
    revocation_policy: Annotated[
        str, typer.Option(help="When the CRL is past nextUpdate: fail-closed or fail-open.")
    ] = "fail-closed",
    emit_mosquitto_conf: Annotated[
        Path | None,
        typer.Option(help="Write a Mosquitto config for this workspace to FILE and exit."),
    ] = None,
    log_connections: Annotated[
        bool,
        typer.Option(help="Also log one JSON event per admitted session and per session end."),
    ] = False,
    crl_url: Annotated[
        str | None,
        typer.Option(help="Fetch the CRL from this URL ('fleet serve' /crl.pem) instead of DIR."),
    ] = None,
    crl_url_every: Annotated[str, typer.Option(help="How often to fetch --crl-url.")] = "5s",
    max_packet_size: Annotated[
        int, typer.Option(help="Largest MQTT packet accepted, in bytes; a larger one closes it.")
    ] = 256 * 1024,
    max_queued_messages: Annotated[
        int, typer.Option(help="Messages kept waiting per session; more are dropped and counted.")
    ] = 1000,
    max_inflight_messages: Annotated[
        int, typer.Option(help="Messages sent to one session at once (QoS 1: until PUBACK).")
    ] = 20,
    max_claim_sessions: Annotated[
        int, typer.Option(help="Live sessions one claim certificate may hold at once.")
    ] = 1000,
) -> None:
    """Run the mutual-TLS MQTT broker in the foreground (Ctrl-C or SIGTERM stops it)."""
    from broker.cli import emit_mosquitto_config, run_broker
    from broker.config import BrokerSettings, RevocationPolicy

    workspace = Workspace.open(directory)
    try:
        policy = RevocationPolicy(revocation_policy)
    except ValueError:
        raise UsageError(
            f"invalid --revocation-policy {revocation_policy!r}: use fail-closed or fail-open"
        ) from None
    settings = BrokerSettings(
        workspace=workspace.paths.root,
        host=host,
        port=port,
        metrics_port=None if metrics_port < 0 else metrics_port,
        env=env,
        handshake_timeout=handshake_timeout,
        revocation_policy=policy,
        log_connections=log_connections,
        crl_url=crl_url,
        crl_url_interval=parse_positive_duration(crl_url_every).total_seconds(),
        max_packet_bytes=max_packet_size,
        max_queued_messages=max_queued_messages,
        max_inflight_messages=max_inflight_messages,
        max_claim_sessions=max_claim_sessions,
    )
    if emit_mosquitto_conf is not None:
        emit_mosquitto_config(workspace, emit_mosquitto_conf, host=host, port=port, limits=settings)
        out.print(f"wrote {emit_mosquitto_conf}: mosquitto -c {emit_mosquitto_conf}")
        return
    run_broker(settings, announce=lambda line: print(line, flush=True))


@app.command()
@friendly_errors
def swarm(
    directory: DirOption = DEFAULT_DIR,
    devices: Annotated[int, typer.Option(help="How many provisioned devices to run.")] = 100,
    ramp: Annotated[str, typer.Option(help="Connection rate, e.g. 300/s.")] = "300/s",
    publish_every: Annotated[str, typer.Option(help="Telemetry interval per device.")] = "10s",
    qos: Annotated[int, typer.Option(help="QoS of telemetry (0 or 1).")] = 1,
    duration: Annotated[str, typer.Option(help="How long the run lasts.")] = "1m",
    target: Annotated[
        str | None,
        typer.Option(
            help="mqtts://HOST:PORT of any mTLS broker (default: start the embedded one)."
        ),
    ] = None,
    server_name: Annotated[
        str, typer.Option(help="Host name the broker certificate must carry.")
    ] = "localhost",
    processes: Annotated[
        str, typer.Option(help="Shard processes: auto (one per core) or N.")
    ] = "auto",
    in_flight: Annotated[int, typer.Option(help="Most handshakes in flight per process.")] = 100,
    payload_size: Annotated[int, typer.Option(help="Telemetry payload bytes.")] = 64,
    mqtt_version: Annotated[str, typer.Option("--mqtt", help="3.1.1 or 5.")] = "3.1.1",
    source_ips: Annotated[
        str | None,
        typer.Option(help="Spread connections over source addresses, e.g. 127.0.0.2-127.0.0.9."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the summary as JSON.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No live view (for CI logs).")] = False,
    renew_at: Annotated[
        str | None,
        typer.Option(
            help="Renew over MQTT at this fraction of each certificate's lifetime (e.g. 0.66); "
            "the embedded broker gets a control plane, a --target needs 'fleet serve --broker'."
        ),
    ] = None,
    pin: Annotated[
        list[str] | None,
        typer.Option(
            help="Pin the broker's key: sha256/BASE64 of its SubjectPublicKeyInfo (repeatable); "
            "a valid chain for another key is then refused (broker_untrusted: pin_mismatch)."
        ),
    ] = None,
) -> None:
    """Connect provisioned devices, each with its own certificate, and keep them publishing."""
    from fleet.cli.swarm import SwarmRequest, run_swarm_command

    request = SwarmRequest.parse(
        workspace=Workspace.open(directory),
        devices=devices,
        ramp=ramp,
        publish_every=publish_every,
        qos=qos,
        duration=duration,
        target=target,
        server_name=server_name,
        processes=processes,
        in_flight=in_flight,
        payload_size=payload_size,
        mqtt_version=mqtt_version,
        source_ips=source_ips,
        renew_at=renew_at,
        pins=pin or (),
    )
    stats = run_swarm_command(request, console=out, quiet=quiet, json_out=json_out)
    if stats.interrupted:
        raise typer.Exit(130)


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


@bench_app.command("handshake")
@friendly_errors
def bench_handshake(
    directory: DirOption = DEFAULT_DIR,
    target: Annotated[
        str | None,
        typer.Option(help="mqtts://HOST:PORT of a broker trusting DIR's CA (default: embedded)."),
    ] = None,
    server_name: Annotated[
        str, typer.Option(help="Host name the broker certificate must carry.")
    ] = "localhost",
    connections: Annotated[
        int, typer.Option(help="Connections, each with its own device certificate.")
    ] = 5000,
    concurrency: Annotated[int, typer.Option(help="Connections in flight (all processes).")] = 100,
    tls: Annotated[str | None, typer.Option(help="Pin the TLS version: 1.2 or 1.3.")] = None,
    key_type: Annotated[
        str | None, typer.Option(help="Device key type: ec-p256, ec-p384, rsa2048, rsa3072.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Also measure TLS session resumption against full handshakes.")
    ] = False,
    reject_mix: Annotated[
        str, typer.Option(help="Share of identities the broker must refuse, e.g. 10%.")
    ] = "0%",
    processes: Annotated[
        str, typer.Option(help="Client processes: auto (one per core) or N.")
    ] = "auto",
    sweep: Annotated[
        str | None, typer.Option(help="Run a series, e.g. concurrency=10,50,100,200.")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="'openssl': also run openssl s_time -new against the same target."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Write report.json and PNG plots to this directory.")
    ] = None,
) -> None:
    """Connection churn (TLS + CONNECT/CONNACK + DISCONNECT) with a certificate per connection."""
    from fleet.cli.bench import BenchRequest, run_bench_command

    request = BenchRequest.parse(
        connections=connections,
        concurrency=concurrency,
        target=target,
        server_name=server_name,
        tls=tls,
        key_type=key_type,
        resume=resume,
        reject_mix=reject_mix,
        processes=processes,
        sweep=sweep,
        reference=reference,
    )
    run_bench_command(Workspace.open(directory), request, console=out, report=report)


@bench_app.command("compare")
@friendly_errors
def bench_compare(
    first: Annotated[Path, typer.Argument(metavar="A", help="report.json (or its directory).")],
    second: Annotated[Path, typer.Argument(metavar="B", help="report.json (or its directory).")],
) -> None:
    """Print two handshake bench runs side by side with ratios (B/A)."""
    from fleet.cli.bench_report import compare

    compare(first, second, out)


@scenario_app.command("list")
@friendly_errors
def scenario_list(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Files or directories (default: the library).")
    ] = None,
) -> None:
    """Show the scenarios of the library (or of PATHS), checked, with what each needs."""
    from fleet.scenario import LIBRARY, load_scenarios

    scenarios = load_scenarios(paths or [LIBRARY])
    # the file column only when a file is not simply <name>.yaml: it would repeat the name
    files = any(s.path.name != f"{s.name}.yaml" for s in scenarios)
    table = Table(header_style="bold")
    table.add_column("scenario", no_wrap=True)
    if files:
        table.add_column("file", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("devices", justify="right", no_wrap=True)
    table.add_column("description", ratio=1, min_width=24)
    for s in scenarios:
        devices = sum(g.count for g in s.groups if g.clone_of is None)
        needs = (
            f" [yellow](needs the mtls-fleet broker: {s.broker.needs_fleet_broker})[/]"
            if s.broker.needs_fleet_broker
            else ""
        )
        cells = [s.name, *([s.path.name] if files else []), str(len(s.steps)), str(devices)]
        table.add_row(*cells, s.description + needs)
    out.print(table)


@scenario_app.command("run")
@friendly_errors
def scenario_run(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Scenario files or directories (default: the whole library)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="mqtts://HOST:PORT of a broker that trusts --dir's CA (default: embedded)."
        ),
    ] = None,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Workspace to use (required with --target; default: a fresh one per scenario).",
        ),
    ] = None,
    server_name: Annotated[
        str, typer.Option(help="Host name the target's certificate must carry.")
    ] = "localhost",
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here (for CI).")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON.")
    ] = None,
    keep_workspace: Annotated[
        bool, typer.Option(help="Keep each scenario's workspace (for inspection).")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No live timeline, only the verdicts.")] = False,
    skip_tag: Annotated[
        list[str] | None,
        typer.Option(help="Leave out scenarios with this tag, e.g. long (repeatable)."),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Run this many scenarios at once, each in its own process, workspace and "
            "embedded broker (no live timeline).",
        ),
    ] = 1,
) -> None:
    """Run scenarios; exit 0 only when every expectation of every scenario held."""
    from fleet.cli.swarm import parse_target
    from fleet.scenario import LIBRARY, ScenarioResult, Target, load_scenarios, run_scenarios
    from fleet.scenario.report import (
        LiveTimeline,
        print_result,
        print_summary,
        write_json,
        write_junit,
    )

    scenarios = load_scenarios(paths or [LIBRARY])  # every file is checked before any runs
    skipped = set(skip_tag or ())
    scenarios = [s for s in scenarios if not skipped & set(s.tags)]
    chosen_target = None
    if target is not None:
        if directory is None:
            raise UsageError(
                "--target needs --dir: the workspace whose CA the target broker trusts"
            )
        host, port = parse_target(target)
        chosen_target = Target(host, port, server_name)
    live = LiveTimeline(out, quiet=quiet)

    def announce(result: ScenarioResult) -> None:
        print_result(result, out)
        out.print()

    for_each = [s.name for s in scenarios]
    out.print(f"running {len(for_each)} scenario(s): {', '.join(for_each)}")
    results = []
    started = time.monotonic()
    if jobs > 1 and len(scenarios) > 1:
        out.print(f"{jobs} at a time, each in its own process: verdicts as they finish")

        def announce_with_title(result: ScenarioResult) -> None:
            out.rule(result.name)
            announce(result)

        results = run_scenarios(
            scenarios,
            target=chosen_target,
            workspace_dir=directory.resolve() if directory else None,
            keep_workspace=keep_workspace,
            on_result=announce_with_title,
            jobs=jobs,
        )
    for scenario in scenarios if not results else ():
        out.rule(
            f"{scenario.name} — {scenario.description}" if scenario.description else scenario.name
        )
        results += run_scenarios(
            [scenario],
            target=chosen_target,
            workspace_dir=directory.resolve() if directory else None,
            keep_workspace=keep_workspace,
            listener=live,
            on_result=announce,
        )
    print_summary(results, out, wall_seconds=time.monotonic() - started if jobs > 1 else None)
    if junit is not None:
        write_junit(results, junit)
        out.print(f"wrote {junit}")
    if json_out is not None:
        write_json(results, json_out)
        out.print(f"wrote {json_out}")
    if not all(r.passed for r in results):
        raise typer.Exit(1)


@app.command()
@friendly_errors
def demo(directory: DirOption = Path("demo-fleet")) -> None:
    """Replay the quickstart scenario in DIR: a fleet connects, one device is revoked live."""
    from fleet.scenario import LIBRARY, load_scenario, run_scenarios
    from fleet.scenario.report import LiveTimeline, print_result

    if directory.exists() and any(directory.iterdir()):
        raise UsageError(f"{directory} is not empty; remove it or choose another --dir")
    scenario = load_scenario(LIBRARY / "quickstart.yaml")
    out.print(f"[bold]{scenario.name}[/]: {scenario.description}")
    (result,) = run_scenarios(
        [scenario], workspace_dir=directory.resolve(), listener=LiveTimeline(out)
    )
    print_result(result, out)
    if not result.passed:
        raise typer.Exit(1)
    out.print(f"the workspace is kept in {directory}: try 'fleet inventory --dir {directory}'")


app.command()(enroll)  # defined with the claims (fleet/cli/claims.py), listed after the others


def main() -> None:
    """Entry point of the ``fleet`` console script."""
    app()


__all__ = ["app", "main"]

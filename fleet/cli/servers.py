"""``fleet serve`` (the control plane) and ``fleet broker`` (the embedded broker)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.support import (
    DirOption,
    friendly_errors,
    out,
)
from fleet.kernel.durations import parse_positive_duration
from fleet.kernel.errors import FleetError, UsageError
from fleet.kernel.signals import stop_on_signals
from fleet.store.workspace import DEFAULT_DIR, Workspace


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
    dashboard_port: Annotated[
        int | None,
        typer.Option(help="Serve the live web dashboard here (0: any free port)."),
    ] = None,
    alerts: Annotated[
        Path | None,
        typer.Option(help="Evaluate these alert rules live (see 'fleet alerts check')."),
    ] = None,
) -> None:
    """Run the control plane: CRL, OCSP and /metrics over HTTP; optionally MQTT and admin API.

    The CRL is kept fresh; with --broker it enrolls devices by claim, renews certificates
    over MQTT and follows the broker's lifecycle events; with --api-port it serves the admin
    API (HTTPS, mutual TLS); with --dashboard-port the web dashboard; with --alerts it
    evaluates alert rules."""
    from fleet.cli.swarm import parse_target
    from fleet.controlplane.alert_rules import load_alert_rules
    from fleet.controlplane.server import ControlPlane

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    workspace = Workspace.open(directory)
    target = parse_target(broker) if broker else None
    rules = load_alert_rules(alerts) if alerts is not None else None
    try:
        plane = ControlPlane(workspace, host=host, port=port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    plane.start()
    try:
        if target is not None:
            plane.answer_requests(*target)
        if rules is not None:
            plane.watch_alerts(rules)
        if api_port is not None:
            plane.serve_admin_api(port=api_port)
        if dashboard_port is not None:
            plane.serve_dashboard(port=dashboard_port)
    except FleetError:
        plane.stop()
        raise
    except OSError as exc:
        plane.stop()
        what = "the dashboard" if plane.api is not None or api_port is None else "the admin API"
        where = dashboard_port if what == "the dashboard" else api_port
        raise UsageError(f"cannot serve {what} on {host}:{where}: {exc.strerror}") from None
    answering = f"; answering certificate requests on {broker}" if broker else ""
    print(f"serving {plane.url} (CRL at /crl and /crl.pem, OCSP at /ocsp){answering}", flush=True)
    if plane.api is not None:
        print(
            f"admin API on https://{host}:{plane.api.port} (mutual TLS, admin certificates)",
            flush=True,
        )
    if plane.dashboard is not None:
        print(f"dashboard on {plane.dashboard.url}", flush=True)
    if rules is not None:
        print(f"alerts: {len(rules.rules)} rule(s) from {alerts}", flush=True)
    with stop_on_signals() as stop:
        while not stop.requested:
            time.sleep(0.2)
    plane.stop()


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
    policy_file: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="Access policy (YAML rules granting topics); default: the tier model.",
        ),
    ] = None,
    groups: Annotated[
        str | None,
        typer.Option(
            help="Key-exchange groups accepted, preferred first (e.g. X25519MLKEM768,X25519); "
            "default: OpenSSL 4.0's list, the hybrid X25519MLKEM768 first."
        ),
    ] = None,
) -> None:
    """Run the mutual-TLS MQTT broker in the foreground (Ctrl-C or SIGTERM stops it)."""
    from broker.cli import emit_mosquitto_config, run_broker
    from broker.config import BrokerSettings, RevocationPolicy
    from fleet.kernel.tls import parse_groups

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
        policy=policy_file,
        groups=parse_groups(groups) if groups else (),
    )
    access = None
    if policy_file is not None:
        from broker.policy import load_policy

        access = load_policy(policy_file)  # a bad file is named before anything starts
    if emit_mosquitto_conf is not None:
        if groups:
            raise UsageError(
                "--groups: Mosquitto 2.0 has no setting for key-exchange groups; give them to "
                "its OpenSSL instead (an OPENSSL_CONF with Groups = ... in its system_default)"
            )
        acl = emit_mosquitto_config(
            workspace, emit_mosquitto_conf, host=host, port=port, limits=settings, policy=access
        )
        if acl is not None:
            out.print(f"wrote {acl}: the policy's topic rights, one block per identity")
        out.print(f"wrote {emit_mosquitto_conf}: mosquitto -c {emit_mosquitto_conf}")
        return
    run_broker(settings, announce=lambda line: print(line, flush=True))

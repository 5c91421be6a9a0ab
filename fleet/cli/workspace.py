"""``fleet init`` and ``fleet demo``: a new workspace, and the quickstart replayed in one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet.cli.support import (
    DirOption,
    friendly_errors,
    out,
)
from fleet.kernel.config import FleetConfig
from fleet.kernel.durations import parse_positive_duration
from fleet.kernel.errors import UsageError
from fleet.kernel.identity import validate_trust_domain
from fleet.kernel.keys import KeyType
from fleet.store.workspace import DEFAULT_DIR, init_workspace


@friendly_errors
def init(
    directory: DirOption = DEFAULT_DIR,
    trust_domain: Annotated[
        str, typer.Option(help="SPIFFE trust domain of device identities.")
    ] = "fleet.local",
    key_type: Annotated[
        str,
        typer.Option(
            help="Devices' default key: ec-p256, ec-p384, rsa2048, rsa3072, ed25519, ml-dsa-44, "
            "ml-dsa-65 or ml-dsa-87 (post-quantum)."
        ),
    ] = "ec-p256",
    ca_key_type: Annotated[
        str | None,
        typer.Option(
            help="The root and issuing CAs' key, of the same choices [default: --key-type]."
        ),
    ] = None,
    broker_key_type: Annotated[
        str | None,
        typer.Option(help="The broker certificate's key [default: the CA's]."),
    ] = None,
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
        ca_key_type=KeyType.parse(ca_key_type) if ca_key_type else None,
        broker_key_type=KeyType.parse(broker_key_type) if broker_key_type else None,
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

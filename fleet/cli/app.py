"""The ``fleet`` command line: thin commands over the library; only this layer exits.

One module per command area; this one assembles them in the order ``fleet --help`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from fleet.cli.admins import admin_app
from fleet.cli.alerts import alerts_app
from fleet.cli.authority import ca_app, crl_app
from fleet.cli.claims import claim_app, enroll
from fleet.cli.cluster import cluster_app
from fleet.cli.devices import export, inventory, renew, revoke, show
from fleet.cli.loadtest import bench_app, swarm
from fleet.cli.policy import policy_app
from fleet.cli.provisioning import provision
from fleet.cli.scenarios import scenario_app
from fleet.cli.servers import broker_command, serve
from fleet.cli.workspace import demo, init

app = typer.Typer(
    name="fleet",
    help="mtls-fleet: a certificate authority, registry and test bench for mutual-TLS IoT fleets.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(crl_app, name="crl")
app.add_typer(ca_app, name="ca")
app.add_typer(claim_app, name="claim")
app.add_typer(admin_app, name="admin")
app.add_typer(bench_app, name="bench")
app.add_typer(scenario_app, name="scenario")
app.add_typer(policy_app, name="policy")
app.add_typer(alerts_app, name="alerts")
app.add_typer(cluster_app, name="cluster")
_COMMANDS: tuple[tuple[str | None, Callable[..., None]], ...] = (
    (None, init),
    (None, provision),
    (None, revoke),
    (None, renew),
    (None, inventory),
    (None, show),
    (None, export),
    (None, serve),
    ("broker", broker_command),
    (None, swarm),
    (None, demo),
    (None, enroll),
)
for name, command in _COMMANDS:
    app.command(name)(command)


def main() -> None:
    """Entry point of the ``fleet`` console script."""
    app()


__all__ = ["app", "main"]
